"""Measurement helpers of the benchmark scripts: CPU and memory readings, statistics of repeated
timings, and writing the figures. Standard library only at import (psutil and rich are optional and
imported where used), so a script can import this before it sets up torch or Ray.
"""

from __future__ import annotations

import json
import random
import resource
import statistics
import sys
from pathlib import Path


# -- CPU ---------------------------------------------------------------------------------------
def machine_cpu_s() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine so far, all cores and all processes, or None
    without psutil. Busy is user + nice + system + irq + softirq + steal (guest time is already
    inside user); total adds idle and iowait. Take two readings and divide the differences."""
    try:
        import psutil
    except ImportError:
        return None
    c = psutil.cpu_times()
    busy = c.user + c.nice + c.system + getattr(c, "irq", 0) + getattr(c, "softirq", 0) + getattr(c, "steal", 0)
    return busy, busy + c.idle + getattr(c, "iowait", 0)


# -- memory ------------------------------------------------------------------------------------
def ru_maxrss_bytes() -> int:
    """``ru_maxrss`` of this process in bytes (the kernel reports KiB on Linux, bytes on macOS).
    On Linux a child starts from the RSS its parent had when it forked, and execve keeps it: for
    the peak of a child's own work use :func:`proc_status_kib` ("VmHWM") and :func:`reset_peak_rss`."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def proc_status_kib(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM) in KiB, or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# -- statistics of repeats ---------------------------------------------------------------------
def quartiles(xs: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile), inclusive method; one value is all three."""
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def median_ci95(xs: list[float], resamples: int = 4000) -> tuple[float, float]:
    """Percentile-bootstrap 95 % interval of the median (fixed seed, so a report re-prints the same)."""
    rnd = random.Random(0)
    meds = sorted(statistics.median(rnd.choices(xs, k=len(xs))) for _ in range(resamples))
    return meds[int(0.025 * resamples)], meds[int(0.975 * resamples) - 1]


def ratio_stats(num: list[float], den: list[float]) -> dict:
    """The per-repeat ratios ``num[i] / den[i]``: median, quartiles, bootstrap 95 % interval of the
    median, and how many."""
    xs = [x / y for x, y in zip(num, den)]
    q1, med, q3 = quartiles(xs)
    lo, hi = median_ci95(xs)
    return {"median": med, "q1": q1, "q3": q3, "ci95_lo": lo, "ci95_hi": hi, "n": len(xs)}


def fmt_iqr(r: dict) -> str:
    """A :func:`ratio_stats` result as ``median (q1-q3)``."""
    return f"{r['median']:.3f} ({r['q1']:.3f}-{r['q3']:.3f})"


# -- output ------------------------------------------------------------------------------------
def print_table(title: str, head: list[str], rows: list[list[str]], width: int = 160) -> None:
    """A table with rich (first column left, the others right), or ``|``-separated lines without it."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        print(" | ".join(head))
        for row in rows:
            print(" | ".join(row))
        return
    t = Table(title=title)
    for i, h in enumerate(head):
        t.add_column(h, justify="left" if i == 0 else "right")
    for row in rows:
        t.add_row(*row)
    Console(width=width).print(t)


def write_json(path, obj, indent: int = 2) -> None:
    """``obj`` as JSON at ``path``; what JSON cannot hold is written as its ``str``."""
    Path(path).write_text(json.dumps(obj, indent=indent, default=str))
