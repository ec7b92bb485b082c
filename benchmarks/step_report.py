"""The report of ``benchmarks/step_overhead.py``: per-repeat ratios, targets with bootstrap
intervals, the printed table, and ``--from-json`` (re-print or pool saved runs).
"""

from __future__ import annotations

import argparse
import json
import statistics

from benchmarks.step_parts import VARIANTS
from benchmarks.timing import fmt_iqr, print_table, ratio_stats

TARGETS = {  # name -> (description, limit)
    "time_dynsdpb_vs_vanilla": ("dynsdpb / vanilla step time", 1.03),
    "mem_dynsdpb_vs_vanilla": ("dynsdpb / vanilla peak memory", 1.05),
    "time_vanilla_vs_plain": ("vanilla / plain Trainer step time", 1.02),
}
MEM_MARK = "STEP_OVERHEAD_MEMORY "
RATIOS = {"dynsdpb/vanilla": ("dynsdpb", "vanilla"), "dlb/vanilla": ("dlb", "vanilla"),
          "vanilla/plain": ("vanilla", "plain")}  # name -> (numerator, denominator)



def summarize(a, timing: dict, memory: dict | None) -> dict:
    runs = timing["runs"]
    per_repeat = {v: [statistics.fmean(x) for x in runs[v]["wall"]] for v in VARIANTS}
    per_repeat_cpu = {v: [statistics.fmean(x) for x in runs[v]["cpu"]] for v in VARIANTS}
    step = {v: {"median_s": statistics.median(per_repeat[v]), "min_s": min(per_repeat[v]),
                "median_cpu_s": statistics.median(per_repeat_cpu[v])} for v in VARIANTS}

    ratios = {k: ratio_stats(per_repeat[n], per_repeat[d]) for k, (n, d) in RATIOS.items()}
    ratios_cpu = {k: ratio_stats(per_repeat_cpu[n], per_repeat_cpu[d]) for k, (n, d) in RATIOS.items()}
    ratios_of_min = {k: step[n]["min_s"] / step[d]["min_s"] for k, (n, d) in RATIOS.items()}
    res = {"step_time": step, "ratios_wall": ratios, "ratios_cpu": ratios_cpu, "ratios_of_min_wall": ratios_of_min,
           "clock": a.clock}
    judged = ratios if a.clock == "wall" else ratios_cpu
    res["targets"] = {"time_dynsdpb_vs_vanilla": judged["dynsdpb/vanilla"]["median"],
                      "time_vanilla_vs_plain": judged["vanilla/plain"]["median"]}
    comp = timing.get("components")
    if comp:
        base = step["vanilla"]["median_s" if a.clock == "wall" else "median_cpu_s"]
        pairs = {"dlb/vanilla": ("dlb", "vanilla"), "dynsdpb/vanilla": ("dynsdpb", "vanilla")}
        if "plain" in comp["compute_loss_stub_s"]:
            pairs["vanilla/plain"] = ("vanilla", "plain")
        res["component_overhead"] = {
            k: {"compute_loss_extra_s": comp["compute_loss_stub_s"][v] - comp["compute_loss_stub_s"][ref],
                "dataloader_extra_s": comp["dataloader_batch_s"][v] - comp["dataloader_batch_s"][ref]}
            for k, (v, ref) in pairs.items()}
        for v, d in res["component_overhead"].items():
            d["fraction_of_vanilla_step"] = (d["compute_loss_extra_s"] + d["dataloader_extra_s"]) / base
    if memory:
        key = "cuda_max_memory_allocated_bytes" if a.device == "cuda" else "peak_rss_bytes"
        res["memory_metric"] = key
        res["memory_ratio"] = memory["dynsdpb"][key] / memory["vanilla"][key]
        inc = [memory[v].get("train_rss_increase_bytes") for v in ("dynsdpb", "vanilla")]
        res["memory_increase_ratio"] = inc[0] / max(1, inc[1]) if None not in inc else None
        res["targets"]["mem_dynsdpb_vs_vanilla"] = res["memory_ratio"]
    res["pass"] = {k: v <= TARGETS[k][1] for k, v in res["targets"].items()}
    # A time verdict is "resolved" when the bootstrap 95 % interval of the median ratio lies on one
    # side of the limit.
    res["ci95"] = {"time_dynsdpb_vs_vanilla": judged["dynsdpb/vanilla"], "time_vanilla_vs_plain": judged["vanilla/plain"]}
    res["resolved"] = {k: not (q["ci95_lo"] <= TARGETS[k][1] < q["ci95_hi"]) for k, q in res["ci95"].items()}
    return res


def print_report(a, timing, memory, summary) -> None:
    mib = 2 ** 20
    judged, other = ("wall", "cpu") if a.clock == "wall" else ("cpu", "wall")
    head = ["variant", "median step s", "min step s", "median CPU s/step", f"x vanilla, {judged} clock (IQR)"]
    if memory:
        head += ["peak RSS MiB", "train() RSS +MiB", "ru_maxrss MiB"]
        head += ["CUDA max alloc MiB"] if a.device == "cuda" else []
    rows = []
    for v in VARIANTS:
        s = summary["step_time"][v]
        if v == "vanilla":
            rel = "1"
        elif v == "plain":
            r = summary[f"ratios_{judged}"]["vanilla/plain"]
            rel = f"vanilla/plain {fmt_iqr(r)}"
        else:
            rel = fmt_iqr(summary[f"ratios_{judged}"][f"{v}/vanilla"])
        row = [v, f"{s['median_s']:.3f}", f"{s['min_s']:.3f}", f"{s['median_cpu_s']:.3f}", rel]
        if memory:
            m = memory[v]
            inc = m.get("train_rss_increase_bytes")
            row += [f"{m['peak_rss_bytes'] / mib:.0f}", "-" if inc is None else f"{inc / mib:.0f}",
                    f"{m.get('ru_maxrss_bytes', m['peak_rss_bytes']) / mib:.0f}"]
            if a.device == "cuda":
                row.append(f"{m['cuda_max_memory_allocated_bytes'] / mib:.0f}")
        rows.append(row)
    title = (f"Step overhead: B={a.batch_size}, seq {a.seq_len}, {a.steps} timed steps x {a.repeats} repeats, "
             f"{a.device}, {timing['threads']} threads")
    print_table(title, head, rows)
    print(f"{other}-clock ratios (median of repeats, IQR): " + ", ".join(
        f"{k} {fmt_iqr(r)}" for k, r in summary[f"ratios_{other}"].items()))
    print("ratios of the fastest repeats (wall): "
          + ", ".join(f"{k} {v:.3f}" for k, v in summary["ratios_of_min_wall"].items()))
    if summary.get("component_overhead"):
        comp = timing["components"]
        print("isolated extras per step (best of rounds):")
        for v in comp["compute_loss_stub_s"]:
            print(f"  {v:8s} compute_loss on stub logits (fwd+bwd) {comp['compute_loss_stub_s'][v] * 1e6:8.1f} us, "
                  f"DataLoader {comp['dataloader_batch_s'][v] * 1e6:8.1f} us/batch")
        for k, d in summary["component_overhead"].items():
            print(f"  {k}: {d['compute_loss_extra_s'] * 1e6:+.1f} us loss, {d['dataloader_extra_s'] * 1e6:+.1f} us "
                  f"data per step = {100 * d['fraction_of_vanilla_step']:+.3f} % of a vanilla step")
    if memory:
        inc = summary["memory_increase_ratio"]
        print(f"memory dynsdpb/vanilla: {summary['memory_metric']} {summary['memory_ratio']:.3f}"
              + ("" if inc is None else f", RSS increase during train() {inc:.3f}")
              + " (peak RSS: VmHWM of each fresh process)")
    m = timing["machine_during_timing"]
    if "cpu_busy_fraction_others" in m:
        print(f"machine during timing: all CPUs {100 * m['cpu_busy_fraction_all']:.0f} % busy, "
              f"{100 * m['cpu_busy_fraction_others']:.0f} % by other processes; load avg 1 min "
              f"{min(m['loadavg_1min_per_repeat']):.2f}-{max(m['loadavg_1min_per_repeat']):.2f}")
    print(f"targets (time: median of per-repeat ratios on the {a.clock} clock, bootstrap 95 % interval):")
    for k, val in summary["targets"].items():
        desc, lim = TARGETS[k]
        ci = summary["ci95"].get(k)
        ci_txt = f" [{ci['ci95_lo']:.3f}, {ci['ci95_hi']:.3f}]" if ci else " " * 16
        note = "" if summary["resolved"].get(k, True) else "  (not resolved: the interval contains the limit)"
        print(f"  {desc:38s} {val:.3f}{ci_txt} <= {lim:.2f}  {'PASS' if summary['pass'][k] else 'FAIL'}{note}")


def reprint(paths: list[str], clock: str | None) -> int:
    """The report of one saved run, or of several pooled (their repeats concatenated)."""
    saved = []
    for path in paths:
        with open(path) as f:
            saved.append(json.load(f))
    same = ("batch_size", "seq_len", "threads", "device")
    for path, s in zip(paths[1:], saved[1:]):
        if any(s["args"][k] != saved[0]["args"][k] for k in same):
            raise SystemExit(f"--from-json: {path} differs from {paths[0]} in one of {', '.join(same)}")
    last = saved[-1]
    timing = {**last["timing"],
              "runs": {v: {c: [rep for s in saved for rep in s["timing"]["runs"][v][c]] for c in ("wall", "cpu")}
                       for v in VARIANTS},
              "machine_during_timing": {
                  "loadavg_1min_per_repeat": [x for s in saved
                                              for x in s["timing"]["machine_during_timing"]["loadavg_1min_per_repeat"]]}}
    clock = last["args"]["clock"] if clock is None else clock
    if clock == "auto":
        clock = "cpu" if last["args"]["threads"] == 1 and last["args"]["device"] == "cpu" else "wall"
    a = argparse.Namespace(**{**last["args"], "clock": clock, "repeats": sum(s["args"]["repeats"] for s in saved)})
    summary = summarize(a, timing, last["memory"])
    print_report(a, timing, last["memory"], summary)
    print(f"(re-printed from {', '.join(paths)}: torch {last['env']['torch']}"
          + (f"; {len(paths)} runs pooled, {a.repeats} repeats" if len(paths) > 1 else "") + ")")
    return 0

