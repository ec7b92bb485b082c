"""The figures of ``benchmarks/sweep_scale.py``: CPU sampling while a design runs, and what one
design's Tune results say about the cluster's slots (work, minimum, utilization, ramp, gaps).

Every figure comes from the stand-in trials' own timestamps (:mod:`benchmarks.standin`):
``standin_t0`` when the trial function was entered, ``standin_t`` at each report.
"""

from __future__ import annotations

import heapq
import os
import resource
import threading
import time

from benchmarks.timing import machine_cpu_s


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class RaySampler(threading.Thread):
    """Samples the CPU seconds of this driver's descendants (GCS, raylet, workers) once a second."""

    def __init__(self, period: float = 1.0):
        super().__init__(daemon=True, name="ray-cpu-sampler")
        import psutil
        self.psutil, self.period = psutil, period
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.names: dict[int, str] = {}
        self.own_cpu = 0.0
        self.stop = threading.Event()
        self.machine0 = machine_cpu_s()
        self._sample()

    def _sample(self) -> None:
        for p in self.psutil.Process(os.getpid()).children(recursive=True):
            try:
                c = p.cpu_times()
            except self.psutil.Error:
                continue
            self.first.setdefault(p.pid, c.user + c.system)
            self.last[p.pid] = c.user + c.system
            if p.pid not in self.names:
                self.names[p.pid] = self._title(p)

    def _title(self, p) -> str:
        """A worker's title is ray::<what it runs>; GCS, raylet and Python helpers go by their program."""
        try:
            cmd = p.cmdline() or [p.name()]
        except self.psutil.Error:
            return "?"
        if cmd[0].startswith("ray::"):
            return cmd[0]
        if os.path.basename(cmd[0]).startswith("python"):  # the script: the first argument not a flag
            cmd = [a for a in cmd[1:] if not a.startswith("-")] or cmd
        return os.path.basename(cmd[0])

    def run(self) -> None:
        t = time.thread_time()
        while not self.stop.wait(self.period):
            self._sample()
        self._sample()
        self.own_cpu = time.thread_time() - t

    def finish(self) -> dict:
        self.stop.set()
        self.join()
        (busy0, total0), (busy1, total1) = self.machine0, machine_cpu_s()
        span = total1 - total0
        by_name: dict[str, float] = {}
        for p in self.last:
            name = self.names.get(p, "?")
            by_name[name] = by_name.get(name, 0.0) + self.last[p] - self.first[p]
        return {"ray_processes_cpu_s": sum(self.last[p] - self.first[p] for p in self.last),
                "ray_processes_cpu_s_by_name": dict(sorted(by_name.items(), key=lambda kv: -kv[1])[:8]),
                "machine_busy_fraction": (busy1 - busy0) / span if span > 0 else None,
                "sampler_cpu_s": self.own_cpu}


def trial_records(grid, fit: tuple[float, float]) -> list[dict]:
    """One record per trial of a Tune ``ResultGrid``: its group, reports and timestamps."""
    out = []
    for r in grid:
        df, c = r.metrics_dataframe, r.config or {}
        rec = {"group": f"{c.get('task')}/{c.get('method')}", "error": r.error is not None, "fit": list(fit),
               "reports": 0, "t0": None, "end": None, "gpu_ids": None, "pid": None}
        if df is not None and len(df) and "standin_t0" in df:
            rec.update(reports=int(len(df)), t0=float(df["standin_t0"].min()), end=float(df["standin_t"].max()),
                       report_times=[float(x) for x in df["standin_t"]], pid=int(df["pid"].iloc[-1]),
                       gpu_ids=str(df["standin_gpu_ids"].iloc[-1]) if "standin_gpu_ids" in df else None)
        out.append(rec)
    return out


def figures(trials: list[dict], fits: list[tuple[float, float]], per_report: float, slots: int,
            t0: float, t1: float) -> dict:
    """Work, minimum, ratio, utilization, occupancy, the ramp, actor gaps, concurrency."""
    ran = [t for t in trials if t["t0"] is not None]
    results = sum(t["reports"] for t in trials)
    work_s, wall = results * per_report, t1 - t0
    occupancy = sum(t["end"] - t["t0"] for t in ran)
    of = {tuple(f): [t for t in ran if t["fit"] == list(f)] for f in fits}
    bound = sum(list_schedule([t["reports"] * per_report for t in sorted(of[tuple(f)], key=lambda t: t["t0"])],
                              slots) for f in fits)
    steady_wall = steady_work = 0.0
    for f in fits:  # each fit from the moment all its slots were first busy (the start-up ramp left out)
        at = f[0] + full_after(of[tuple(f)], f[0], slots)
        steady_wall += f[1] - at
        steady_work += per_report * sum(x > at for t in of[tuple(f)] for x in t["report_times"])
    gaps = []  # an actor's idle time between one trial's last report and the next trial's entry
    for pid in {t["pid"] for t in ran}:
        mine = sorted((t for t in ran if t["pid"] == pid), key=lambda t: t["t0"])
        gaps += [b["t0"] - a["end"] for a, b in zip(mine, mine[1:])]
    gaps.sort()
    return {
        "trials": len(trials), "trials_ran": len(ran), "errors": sum(t["error"] for t in trials),
        "results": results, "work_s": work_s, "slots": slots, "wall_s": wall, "minimum_s": work_s / slots,
        "ratio": wall / (work_s / slots) if work_s else None,
        "utilization": work_s / (slots * wall), "occupancy": occupancy / (slots * wall),
        "steady_wall_s": steady_wall, "steady_work_s": steady_work,
        "steady_ratio": steady_wall / (steady_work / slots) if steady_work else None,
        "steady_utilization": steady_work / (slots * steady_wall) if steady_wall else None,
        "actor_gaps": {"n": len(gaps), "total_slot_s": sum(gaps), "median_s": gaps[len(gaps) // 2] if gaps else None,
                       "p90_s": gaps[int(len(gaps) * 0.9)] if gaps else None},
        "list_schedule_bound_s": bound, "ratio_to_list_schedule": wall / bound if bound else None,
        "start_s": min(t["t0"] for t in ran) - t0 if ran else None,
        "tail_s": t1 - max(t["end"] for t in ran) if ran else None,
        "report_wait_s": occupancy - work_s,
        "max_concurrency": max_concurrency([(t["t0"], t["end"]) for t in ran]),
        "fit_walls_s": [f1 - f0 for f0, f1 in fits],
        "fit_start_s": [min([t["t0"] for t in of[tuple(f)]], default=f[0]) - f[0] for f in fits],
        "full_after_s": [full_after(of[tuple(f)], f[0], slots) for f in fits],
        "actor_processes": len({t["pid"] for t in ran}),
    }


def mlflow_runs(folder, name: str) -> int | None:
    """The runs in MLflow experiment ``name`` of ``folder/mlflow.db`` (None without one)."""
    from mlflow import MlflowClient

    client = MlflowClient("sqlite:///" + str(folder / "mlflow.db")) if (folder / "mlflow.db").exists() else None
    exp = client.get_experiment_by_name(name) if client else None
    return len(client.search_runs([exp.experiment_id], max_results=5000)) if exp else None


def list_schedule(durations: list[float], slots: int) -> float:
    """Makespan of ``durations`` started in this order, each on the first free slot."""
    free = [0.0] * slots
    end = 0.0
    for d in durations:
        t = heapq.heappop(free)
        heapq.heappush(free, t + d)
        end = max(end, t + d)
    return end


def full_after(trials: list[dict], start: float, slots: int) -> float:
    """Seconds from ``start`` until ``slots`` trials first ran at once (or the peak, if never)."""
    events = sorted([(t["t0"], 1) for t in trials] + [(t["end"], -1) for t in trials], key=lambda e: (e[0], e[1]))
    now, peak, when = 0, 0, start
    for at, d in events:
        now += d
        if now > peak:
            peak, when = now, at
        if now >= slots:
            return at - start
    return when - start


def max_concurrency(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals], key=lambda e: (e[0], e[1]))
    now = peak = 0
    for _, d in events:
        now += d
        peak = max(peak, now)
    return peak


def check_gpus(trials: list[dict], per_trial: float) -> dict:
    """Whether every running trial had its GPU share: at most 1/per_trial trials per GPU id at
    once (fractions), and disjoint whole GPUs (per_trial >= 1)."""
    ids = {i: [g for g in (t["gpu_ids"] or "").split(",") if g] for i, t in enumerate(trials)}
    ok_count = all(len(v) == max(1, int(per_trial)) for v in ids.values())
    worst = 0
    for t in trials:  # at each trial's start: who else runs, on which GPU ids
        per_gpu: dict[str, int] = {}
        for j, u in enumerate(trials):
            if u["t0"] <= t["t0"] < u["end"]:
                for g in ids[j]:
                    per_gpu[g] = per_gpu.get(g, 0) + 1
        worst = max([worst, *per_gpu.values()])
    cap = 1 if per_trial >= 1 else int(round(1 / per_trial))
    return {"ids_per_trial_ok": ok_count, "max_trials_per_gpu": worst, "allowed_per_gpu": cap,
            "distinct_gpu_ids": sorted({g for v in ids.values() for g in v}), "ok": ok_count and worst <= cap}


def show(r: dict) -> None:
    f = lambda xs: "[" + ", ".join(f"{x:.1f}" for x in xs) + "]"  # noqa: E731
    print(f"  [{r['design']}] {r['tuners']} tuner(s), {r['trials']} trials ({r.get('outcomes')}), "
          f"{r['results']} results, errors {r['errors']}")
    print(f"    wall {r['wall_s']:.1f} s; minimum {r['minimum_s']:.1f} s; ratio {r['ratio']:.3f}; "
          f"utilization {r['utilization']:.1%}; occupancy {r['occupancy']:.1%}")
    print(f"    list-schedule bound {r['list_schedule_bound_s']:.1f} s (wall/bound {r['ratio_to_list_schedule']:.3f}); "
          f"first trial after {r['start_s']:.1f} s; tail {r['tail_s']:.1f} s; max concurrency {r['max_concurrency']}; "
          f"report waits {r['report_wait_s']:.0f} slot-s")
    if r["steady_ratio"]:
        print(f"    after the ramp (all slots first busy → end): wall {r['steady_wall_s']:.1f} s; work "
              f"{r['steady_work_s']:.0f} slot-s; ratio {r['steady_ratio']:.3f}; utilization {r['steady_utilization']:.1%}")
    g = r["actor_gaps"]
    if g["n"]:
        print(f"    an actor between two trials: {g['n']} gaps, {g['total_slot_s']:.0f} slot-s in all, median "
              f"{g['median_s']:.2f} s, p90 {g['p90_s']:.2f} s")
    print(f"    per Tuner: fit {f(r['fit_walls_s'])} s, first trial after {f(r['fit_start_s'])} s, all slots busy "
          f"after {f(r['full_after_s'])} s; trial actor processes {r['actor_processes']}")
    print("    Ray processes by name (CPU-s): " + ", ".join(f"{k} {v:.1f}" for k, v in
                                                          r["ray_processes_cpu_s_by_name"].items()))
    print(f"    driver CPU {r['driver_cpu_s']:.1f} s = {r['driver_cpu_s_per_1000_results']:.1f} s per 1,000 results; "
          f"Ray processes {r['ray_processes_cpu_s']:.1f} s; machine busy {r['machine_busy_fraction']:.0%} of "
          f"{os.cpu_count()} cores; MLflow trial runs {r.get('mlflow_trial_runs')}")
