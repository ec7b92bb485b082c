"""A real crash for the retry tests, delivered at the Tune level (no hook in the product).

:class:`KillOnFirstCheckpoint` is a ``ray.tune.Callback``. It SIGKILLs a process once Tune has
registered a trial's first checkpoint (``on_trial_save`` runs after the save is processed, and
before Tune asks the trial for its next result), so the retry has exactly that checkpoint to
continue from. Killed are, as a preempted node or the OOM killer would do:

- ``target="trial"``: the trial's own process (the ``pid`` Tune puts in every result);
- ``target="train-worker"``: one Ray Train worker of a DDP trial (a ``RayTrainWorker`` process
  of this test's own Ray, found among this process's descendants, never another Ray's).

It happens once: the first trial to take the token file is hit; the killed pids are written to
``<token>.killed`` (a file: Tune may run a copy of the callback). Pass it to a ``RunConfig`` of
your own, or, for a Tuner the product builds (``run_sweep``), through Ray Tune's own environment
variable: ``RAY_TUNE_CALLBACKS=faults.KillOnFirstCheckpoint`` with ``KILL_TOKEN`` (the token
file) and ``KILL_TARGET`` set (Tune builds env callbacks without arguments).
"""

from __future__ import annotations

import os
import signal

import psutil
from ray import tune

ENV = "faults.KillOnFirstCheckpoint"


class KillOnFirstCheckpoint(tune.Callback):
    def __init__(self, token: str | None = None, target: str | None = None):
        self.token = token or os.environ["KILL_TOKEN"]
        self.target = target or os.environ.get("KILL_TARGET", "trial")

    def on_trial_save(self, iteration, trials, trial, **info):
        try:
            os.remove(self.token)
        except FileNotFoundError:
            return
        pids = [trial.last_result["pid"]] if self.target == "trial" else train_workers()[:1]
        assert pids, f"no process to kill for target {self.target!r}"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        with open(f"{self.token}.killed", "w") as f:
            f.write(" ".join(map(str, pids)))


def killed(token) -> list[int]:
    """The pids the callback of ``token`` killed ([] before it did)."""
    try:
        with open(f"{token}.killed") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


def train_workers() -> list[int]:
    """The pids of this process's Ray Train workers (Ray names each actor's process after it)."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                out.append(p.pid)
        except psutil.Error:  # ended meanwhile
            pass
    return sorted(out)
