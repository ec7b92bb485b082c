"""The sweep's console: the header, the live progress table and the summary.

``print_header`` says what the sweep runs and where; :class:`ProgressTable` draws one row per
(task, arm) while Tune runs (fed by :class:`ProgressCallback`); ``print_summary`` sets each arm's
best beside the trivial baseline and says where to find everything; ``arm_problems`` names the
arms without a scored trial (the CLI exits 1 on them).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ray import tune
from rich.console import Console
from rich.live import Live
from rich.table import Table

from . import results as R
from .baselines import learned_line
from .searching import tie_notes
from .state import JOURNAL_FILE, SweepState, arm_key
from .storage import redact


def console():
    """rich's console; written to a file or a pipe (a log, CI), it is wide enough for the tables,
    and commands and paths stay whole, to copy and paste."""
    return Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)


def print_header(state: SweepState, out: Path) -> None:
    c = console()
    tasks = ", ".join(f"{n} ({t.train_size} train / {t.eval_size} eval, {t.metric.removeprefix('eval_')})"
                      for n, t in state.tasks.items())
    c.print(f"[bold]sweep {state.spec['name']}[/bold]: {tasks}")
    c.print(f"model {state.model_path}; arms {', '.join(state.methods)} × {state.num_samples} trials each")
    c.print(f"MLflow {state.tracking_uri}; folder {out}")
    if str(state.storage_path) != str(out / "ray"):
        c.print(f"storage {redact(state.storage_path)}")


class ProgressTable:
    """A live table with one row per (task, arm): trials done/running/pending, best so far, ETA."""

    current: "ProgressTable | None" = None  # the driver's table; the Tune callback looks it up

    def __init__(self, state: SweepState, enabled: bool = True):
        self.state, self.enabled = state, enabled
        self.trials: dict[str, dict] = {}
        self.start = time.time()
        self._live = None
        ProgressTable.current = self

    def update(self, trial, status: str, result: dict | None = None) -> None:
        if not self.enabled:
            return
        c = trial.config or {}
        row = self.trials.setdefault(trial.trial_id, {"group": (c.get(R.TASK), c.get(R.METHOD)), "best": None})
        row["status"] = status
        if result and R.finite(result.get(R.OBJECTIVE)):
            row["best"] = max(row["best"], result[R.OBJECTIVE]) if row["best"] is not None else result[R.OBJECTIVE]
        self._render()

    def _render(self) -> None:
        n = self.state.num_samples
        t = Table(title=f"tune-dynsdpb sweep {self.state.spec['name']}", expand=False)
        for col in ("task", "arm", "done", "running", "pending", "failed", "best so far", "ETA"):
            t.add_column(col)
        elapsed = time.time() - self.start
        for key, arm in self.state.arms.items():
            rows = [r for r in self.trials.values() if r["group"] == (arm.task, arm.method)]
            done = sum(r["status"] in ("DONE", "STOPPED", "FAILED") for r in rows)
            running = sum(r["status"] == "RUNNING" for r in rows)
            failed = sum(r["status"] == "FAILED" for r in rows)
            objs = [r["best"] for r in rows if r["best"] is not None]
            mode = self.state.tasks[arm.task].mode
            best = "" if not objs else f"{(max(objs) if mode == 'max' else -max(objs)):.4f}"
            eta = "" if not done else f"{elapsed / done * (n - done):.0f} s" if done < n else "-"
            t.add_row(arm.task, arm.method, f"{done}/{n}", str(running), str(max(0, n - done - running)),
                      str(failed), best, eta)
        if self._live is None:
            self._live = Live(t, console=console(), refresh_per_second=2, transient=False)
            self._live.start()
        else:
            self._live.update(t)

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


class ProgressCallback(tune.Callback):
    """Feeds the driver's ProgressTable; holds nothing, so Tune can pickle it."""

    def _update(self, trial, status, result=None):
        if ProgressTable.current is not None:
            ProgressTable.current.update(trial, status, result)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._update(trial, "RUNNING")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._update(trial, "RUNNING", result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        outcome = R.classify(trial.last_result)
        self._update(trial, {R.Outcome.FINISHED: "DONE", R.Outcome.STOPPED: "STOPPED"}.get(outcome, "FAILED"))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._update(trial, "FAILED")


def short_config(config: dict) -> str:
    keys = ("learning_rate", "per_device_train_batch_size", "alpha0", "tau0", "lambda_alpha", "lambda_tau",
            "distill_warmup", "granularity")
    names = {"learning_rate": "lr", "per_device_train_batch_size": "B"}
    return " ".join(f"{names.get(k, k)}={config[k]:.3g}" if isinstance(config[k], float) else
                    f"{names.get(k, k)}={config[k]}" for k in keys if k in config)


def arm_problems(state: SweepState) -> list[str]:
    """One line per arm that has no scored trial, e.g. ``rte/dlb: 8 of 8 trials failed: ...``."""
    lines = []
    for key, arm in state.arms.items():
        if arm.best is None:
            failed = arm.counts.get(R.Outcome.FAILED.value, 0)
            why = f": {arm.failures[0]}" if arm.failures else ""
            lines.append(f"{key}: {failed} of {arm.started} trials failed{why}" if arm.started
                         else f"{key}: no trial ran")
    return lines


def print_summary(state: SweepState, out: Path) -> None:
    out_console = console()
    problems, ties = arm_problems(state), tie_notes(state)
    for name, task in state.tasks.items():
        t = Table(title=f"{name}: best per arm ({task.metric}, {task.mode})")
        t.add_column("arm")
        t.add_column("score")
        t.add_column("vs trivial baseline", no_wrap=True)
        t.add_column("trials fin/stop/fail", no_wrap=True)
        t.add_column("best config")
        for m in state.methods:
            arm = state.arms.get(arm_key(name, m))
            if arm is None:
                continue
            b = arm.best
            config = short_config(b.config) if b else "-"
            t.add_row(m, "-" if b is None else f"{b.score:.4f}",
                      learned_line(b.score if b else None, task.baseline, task.metric, task.mode),
                      "/".join(str(arm.counts.get(o.value, 0)) for o in R.Outcome), config)
        out_console.print(t, soft_wrap=False)
    uri = state.tracking_uri
    out_console.print(f"MLflow: experiment '{state.spec['name']}', parent run {state.parent_run_id}")
    out_console.print(f"  mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite") else f"  {uri}")
    out_console.print(f"  optuna-dashboard {out / JOURNAL_FILE}")
    if state.disk_bytes is not None:
        out_console.print(f"Sweep folder: {out} ({state.disk_bytes / 2**20:.1f} MiB)")
    for line in problems:
        out_console.print(f"[red]no scored trial[/red]: {line}")
    for line in ties:  # every arm trains its own method; say why two still score the same
        out_console.print(f"tie: {line}")


__all__ = ["console", "print_header", "print_summary", "ProgressTable", "ProgressCallback", "short_config",
           "arm_problems"]
