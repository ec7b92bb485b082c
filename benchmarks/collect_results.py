"""Gathers the finals of every real-data task into the table of docs/results.md.

Reads ``<runs>/<task>/report-{epochs,compute}/finals.json`` (written by ``tune-dynsdpb compare``)
and prints three Markdown tables: a summary with one row per task and budget (the arms' means, and
dynsdpb's paired differences with t-test and Wilcoxon p-values), each arm's best sweep config, and
the full table: per task,
budget and arm, the metric's mean ± std with its 95% CI, the paired p-values and effect sizes of
dynsdpb against dlb and vanilla, and the compute spent. It also copies each report's plots next to
docs/results.md.

    python benchmarks/collect_results.py runs/real --plots docs/results > /tmp/table.md
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from tune_dynsdpb.compare import same_runs

TASKS = ("rte", "mrpc", "cola", "cb", "stsb", "sst2")
PROTOCOLS = ("", "-large")  # benchmarks/real/<task>.yaml and <task>-large.yaml


def fmt(v, digits=3):
    return "–" if v is None else f"{v:.{digits}f}"


def rows_for(task: str, report: dict) -> list[str]:
    out = []
    paired = report.get("paired", {})
    for arm, a in report["arms"].items():
        if arm == "dynsdpb":
            tests = []
            for other in ("dlb", "vanilla"):
                p = paired.get(f"dynsdpb-{other}")
                if p:
                    tests.append(f"vs {other}: Δ={p['mean_diff']:+.3f}, p={fmt(p['p_ttest'])}, d_z={fmt(p['d_z'], 2)}")
            test = "; ".join(tests)
        else:
            test = ""
        out.append(f"| {task} | {report['budget']} | {arm} | {a['n']} | {fmt(a['mean'])} ± {fmt(a['std'])} | "
                   f"[{fmt(a['ci_low'])}, {fmt(a['ci_high'])}] | {test} | {a['num_train_epochs']} | "
                   f"{a['sample_passes_mean']:.0f} | {fmt(a['wall_s_mean'], 0)} |")
    return out


def summary_row(task: str, report: dict) -> str:
    arms, paired = report["arms"], report.get("paired", {})
    means = " | ".join(fmt(arms[m]["mean"]) if m in arms else "–" for m in ("vanilla", "dlb", "dynsdpb"))
    diffs = []
    for other in ("dlb", "vanilla"):
        p = paired.get(f"dynsdpb-{other}")
        if not p:
            diffs.append("–")
        elif p["mean_diff"] == 0 and p["sd_diff"] == 0:
            same = other == "dlb" and same_runs(report["best_configs"])
            diffs.append("0 (identical runs)" if same else "0 on every seed")
        else:
            diffs.append(f"{p['mean_diff']:+.3f} (t p={fmt(p['p_ttest'])}, W p={fmt(p.get('p_wilcoxon'))})")
    return f"| {task} | {report['metric']} | {report['budget']} | {means} | {' | '.join(diffs)} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, help="folder with one sweep folder per task")
    ap.add_argument("--plots", type=Path, help="copy the PNGs here as <task>-<budget>-<plot>.png")
    a = ap.parse_args()
    reports = [(task + suffix, json.loads(path.read_text()), path)
               for task in TASKS for suffix in PROTOCOLS for budget in ("epochs", "compute")
               if (path := a.runs / (task + suffix) / f"report-{budget}" / "finals.json").exists()]
    print("| task | metric | budget | vanilla | dlb | dynsdpb | dynsdpb − dlb | dynsdpb − vanilla |")
    print("|---|---|---|---|---|---|---|---|")
    for task, report, _ in reports:
        print(summary_row(task, report))
    print()
    print("| task | arm | learning rate | α0 | τ0 | λα | λτ |")
    print("|---|---|---|---|---|---|---|")
    for task, report, _ in reports:
        if report["budget"] != "epochs":  # the same sweep, so the same best configs
            continue
        for arm, c in report["best_configs"].items():
            print(f"| {task} | {arm} | " + " | ".join(
                "–" if c.get(k) is None else f"{c[k]:.3g}"
                for k in ("learning_rate", "alpha0", "tau0", "lambda_alpha", "lambda_tau")) + " |")
    print()
    print("| task | budget | arm | seeds | metric mean ± std | 95% CI | paired test (dynsdpb − other) | epochs "
          "| sample-passes / run | wall s / run |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for task, report, path in reports:
        for row in rows_for(f"{task} ({report['metric']})", report):
            print(row)
        if a.plots:
            a.plots.mkdir(parents=True, exist_ok=True)
            for png in report.get("plots", []):
                shutil.copy(path.parent / png, a.plots / f"{task}-{report['budget']}-{png}")


if __name__ == "__main__":
    main()
