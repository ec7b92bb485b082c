"""The method's parameters, each defined once: name, type, default, bounds or choices, help, CLI flag.

Everything else derives from this table: the fields and checks of
:class:`~tune_dynsdpb.trainer.DynSDPBConfig`, the ``train`` command's method flags, and the sweep
file's schema. Change a bound here and all of them follow. The module imports nothing from the
package but :mod:`tune_dynsdpb.errors`, so any module can import it cheaply.

Public API::

    METHODS, Method, PAIRED_METHODS, DEFAULT_METHOD      the method names (METHOD_HELP: their help text)
    Granularity                                           Literal["sample", "batch"]
    PARAMS: dict[str, Param]                              the method parameters, by config field name
    TRAINING_PARAMS: dict[str, Param]                     training numbers the CLI / sweep files check
    param(name) -> Param                                  from either table; KeyError if unknown
    check_value(name, value) -> str | None                what is wrong with one value, or None
    check_batch_size(method, size) -> str | None          the half-batch rule of the paired methods
    check_tau0_in_range(tau0, tau_range) -> str | None    the one rule that ties two parameters
    check_distinct(method, values, regression) -> (name, problem) | None   no arm trains exactly another
    check_schedule(value) -> str | None                   a (step, alpha, tau) schedule, ordered by step
    alpha_tau_at, effective_schedule, continue_schedule   reading and extending a schedule (dlb, pbt)
    check_values(values, method=None) -> (name, problem) | None   all of the above over a mapping
    methods_using(name) -> tuple[str, ...]                which methods read a parameter
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping, get_args

Method = Literal["vanilla", "dlb", "dlb_warmup", "dynsdpb", "pbt"]
METHODS: tuple[str, ...] = get_args(Method)
Granularity = Literal["sample", "batch"]
DEFAULT_METHOD: str = "dynsdpb"
# Methods that split each batch into two halves (the previous batch's second half + a new one):
# their batch size must be even and >= 2.
PAIRED_METHODS: frozenset[str] = frozenset(m for m in METHODS if m != "vanilla")


def passes_per_epoch(method: str) -> int:
    """Forward passes per training sample and epoch: a paired method sees each sample twice (in its
    new half, then as the previous batch's half), so per epoch it takes twice vanilla's steps."""
    return 2 if method in PAIRED_METHODS else 1


METHOD_HELP = ("vanilla: plain fine-tuning; dlb: static alpha0/tau0; dlb_warmup: dlb with the term off for the "
               "first distill_warmup of the steps; dynsdpb: adaptive alpha/tau; pbt: dlb whose alpha/tau "
               "population-based training changes during training (or a schedule it learned, replayed)")

_DISTILLING = ("dlb", "dlb_warmup", "dynsdpb", "pbt")
# Methods whose consistency term is static DLB's, with alpha/tau from a schedule when one is given.
SCHEDULED: tuple[str, ...] = ("dlb", "pbt")
Schedule = tuple[tuple[int, float, float], ...]  # ((step, alpha, tau), ...), ordered by step


@dataclass(frozen=True)
class Param:
    """One parameter. ``type`` is ``float``, ``int``, ``str`` (with ``choices``), ``tuple`` (a
    pair of floats, each element within the bounds, ordered low <= high) or ``list`` (the
    schedule: ``(step, alpha, tau)`` entries, see :func:`check_schedule`)."""

    name: str
    type: type
    default: Any
    help: str
    flag: str
    methods: tuple[str, ...] = METHODS
    low: float | None = None
    low_inclusive: bool = True
    high: float | None = None
    high_inclusive: bool = True
    choices: tuple[Any, ...] | None = None

    @property
    def rule(self) -> str:
        """The allowed values in words: ``>= 0``, ``in [0, 1)``, ``one of sample, batch``."""
        if self.choices is not None:
            return "one of " + ", ".join(map(str, self.choices))
        lo, hi = self.low, self.high
        if lo is not None and hi is not None:
            return f"in {'[' if self.low_inclusive else '('}{lo:g}, {hi:g}{']' if self.high_inclusive else ')'}"
        if lo is not None:
            return f"{'>=' if self.low_inclusive else '>'} {lo:g}"
        if hi is not None:
            return f"{'<=' if self.high_inclusive else '<'} {hi:g}"
        return "any number"

    def contains(self, x: float) -> bool:
        """Whether one number lies within the bounds (no type check)."""
        if self.low is not None and not (x >= self.low if self.low_inclusive else x > self.low):
            return False
        if self.high is not None and not (x <= self.high if self.high_inclusive else x < self.high):
            return False
        return True


PARAMS: dict[str, Param] = {p.name: p for p in (
    Param("alpha0", float, 1.0, "consistency weight", "--alpha0", _DISTILLING, low=0.0),
    Param("tau0", float, 3.0, "distillation temperature (inside tau_range)", "--tau0", _DISTILLING,
          low=0.0, low_inclusive=False),
    Param("lambda_alpha", float, 1.0, "dynsdpb: alpha = alpha0 * c^lambda_alpha", "--lambda-alpha", ("dynsdpb",),
          low=0.0),
    Param("lambda_tau", float, 0.5, "dynsdpb: tau = tau0 * (1 + lambda_tau * u)", "--lambda-tau", ("dynsdpb",),
          low=-1.0, low_inclusive=False),
    Param("granularity", str, "sample", "dynsdpb: per-sample alpha/tau, or from batch means of u and c",
          "--granularity", ("dynsdpb",), choices=get_args(Granularity)),
    Param("tau_range", tuple, (0.05, 20.0), "dynsdpb: clamp range (LOW HIGH) for tau; tau0 must lie inside it",
          "--tau-range", ("dynsdpb",), low=0.0, low_inclusive=False),
    Param("distill_warmup", float, 0.25, "dlb_warmup: the consistency term is off while "
          "global_step < distill_warmup * max_steps (0 would be dlb itself)", "--distill-warmup", ("dlb_warmup",),
          low=0.0, low_inclusive=False, high=1.0, high_inclusive=False),
    Param("schedule", list, (), "dlb/pbt: piecewise-constant alpha/tau: from optimizer step STEP on (global_step "
          ">= STEP), alpha and tau are ALPHA and TAU; before the first entry alpha0 and tau0",
          "--schedule", SCHEDULED),
)}

# Training numbers (TrainingArguments fields, CLI spelling) that the CLI and sweep files check.
# max_steps is special (-1 means unset) and has its own rule in check_value.
TRAINING_PARAMS: dict[str, Param] = {p.name: p for p in (
    Param("learning_rate", float, 2e-5, "peak learning rate", "--learning-rate", low=0.0, low_inclusive=False),
    Param("weight_decay", float, 0.01, "AdamW weight decay", "--weight-decay", low=0.0),
    Param("warmup_ratio", float, 0.0, "fraction of the steps for the learning-rate warm-up", "--warmup-ratio",
          low=0.0, high=1.0, high_inclusive=False),
    Param("num_train_epochs", float, 3.0, "training epochs", "--epochs", low=0.0, low_inclusive=False),
    Param("max_steps", int, -1, "optimizer steps (-1: from --epochs)", "--max-steps", low=1.0),
    Param("per_device_train_batch_size", int, 32, "per-device batch size B (even for the paired methods)",
          "--batch-size", low=1.0),
    Param("gradient_accumulation_steps", int, 1, "micro-batches per optimizer step", "--gradient-accumulation-steps",
          low=1.0),
    Param("max_length", int, 128, "maximum tokens per sample", "--max-length", low=2.0),
    # Optional (None: off): every value check accepts None for it.
    Param("max_truncated_fraction", float, None, "refuse a split when more than this share of its samples is "
          "cut at max_length (causal LMs: dropped, their answer would lose tokens); unset: count and warn only",
          "--max-truncated-fraction", low=0.0, high=1.0),
)}


def param(name: str) -> Param:
    """The :class:`Param` called ``name`` (a config field name), method or training; KeyError if unknown."""
    if name in PARAMS:
        return PARAMS[name]
    return TRAINING_PARAMS[name]


def methods_using(name: str) -> tuple[str, ...]:
    """The methods whose training reads ``name``."""
    return param(name).methods


def _is_number(v: Any, integer: bool = False) -> bool:
    if isinstance(v, bool):
        return False
    if integer:
        return isinstance(v, int) or (isinstance(v, float) and v.is_integer())
    return isinstance(v, (int, float))


def check_value(name: str, value: Any) -> str | None:
    """What is wrong with ``value`` for parameter ``name``, e.g. ``"must be >= 0 (got -0.1)"``; None if fine.

    The message does not repeat the name: callers prefix it with the spelling their user typed
    (a config field, a CLI flag, a sweep-file key). Raises KeyError for an unknown name.
    """
    got = f"(got {value!r})"
    if name == "method":
        return None if value in METHODS else f"must be one of {', '.join(METHODS)} {got}"
    p = param(name)
    if value is None and p.default is None:  # an optional parameter left unset
        return None
    if p.choices is not None:
        return None if value in p.choices else f"must be {p.rule} {got}"
    if p.type is list:
        return check_schedule(value)
    if p.type is tuple:
        if not isinstance(value, (tuple, list)) or len(value) != 2 or not all(_is_number(v) for v in value):
            return f"must be two numbers LOW HIGH {got}"
        lo, hi = value
        if not all(math.isfinite(v) for v in value):
            return f"must be two finite numbers {got}"
        if not (p.contains(lo) and p.contains(hi)):
            return f"must have both ends {p.rule} {got}"
        if not lo <= hi:
            return f"must have LOW <= HIGH {got}"
        return None
    if name == "max_steps":
        if not _is_number(value, integer=True) or not (value == -1 or p.contains(value)):
            return f"must be -1 (unset) or an integer {p.rule} {got}"
        return None
    if p.type is int and not _is_number(value, integer=True):
        return f"must be an integer {p.rule} {got}"
    if not _is_number(value):
        return f"must be a number {p.rule} {got}"
    if not math.isfinite(value):
        return f"must be a finite number {got}"
    if not p.contains(value):
        return f"must be {p.rule} {got}"
    return None


def check_schedule(value: Any) -> str | None:
    """A schedule is a sequence of ``(step, alpha, tau)``: step a whole number >= 0, strictly
    increasing (ordered by step), alpha within alpha0's bounds, tau within tau0's. None if fine."""
    if not isinstance(value, (tuple, list)):
        return f"must be a list of (step, alpha, tau) (got {value!r})"
    last = None
    for i, entry in enumerate(value):
        if (not isinstance(entry, (tuple, list)) or len(entry) != 3 or not all(_is_number(v) for v in entry)
                or not all(math.isfinite(v) for v in entry)):
            return f"entry {i} must be three numbers (step, alpha, tau) (got {entry!r})"
        step, alpha, tau = entry
        if not _is_number(step, integer=True) or step < 0:
            return f"entry {i}: step must be a whole number >= 0 (got {step!r})"
        if last is not None and step <= last:
            return f"must be ordered by step: entry {i} (step {step:g}) comes after step {last:g}"
        for name, v in (("alpha0", alpha), ("tau0", tau)):
            if not PARAMS[name].contains(v):
                return f"entry {i}: {name.removesuffix('0')} must be {PARAMS[name].rule} (got {v!r})"
        last = step
    return None


def parse_schedule_entry(text: str) -> tuple[float, float, float]:
    """``"STEP:ALPHA:TAU"`` (the ``--schedule`` flag) as three numbers; checked by :func:`check_schedule`."""
    parts = text.split(":")
    if len(parts) != 3:
        raise ValueError(f"expected STEP:ALPHA:TAU, got {text!r}")
    step, alpha, tau = (float(x) for x in parts)
    return (int(step) if step.is_integer() else step), alpha, tau


def normalize_schedule(value: Any) -> Schedule:
    """A checked schedule as a tuple of ``(int step, float alpha, float tau)``."""
    return tuple((int(s), float(a), float(t)) for s, a, t in value)


def alpha_tau_at(schedule: Schedule, step: int, alpha0: float, tau0: float) -> tuple[float, float]:
    """The (alpha, tau) in effect at optimizer step ``step`` (``global_step``): the last entry whose
    step is <= ``step``, or (alpha0, tau0) before the first entry."""
    alpha, tau = alpha0, tau0
    for s, a, t in schedule:
        if s > step:
            break
        alpha, tau = a, t
    return alpha, tau


def effective_schedule(schedule: Schedule, alpha0: float, tau0: float) -> Schedule:
    """The whole schedule a run follows, starting at step 0 (``(0, alpha0, tau0)`` first if the
    schedule starts later)."""
    schedule = normalize_schedule(schedule)
    if schedule and schedule[0][0] == 0:
        return schedule
    return ((0, float(alpha0), float(tau0)),) + schedule


def continue_schedule(past: Any, step: int, alpha: float, tau: float) -> Schedule:
    """A schedule restored at optimizer step ``step`` with new (alpha, tau): ``past``'s entries
    before ``step``, then ``(step, alpha, tau)`` where that changes the value in effect (PBT's
    exploit: the history of the checkpoint, the mutated config from there on)."""
    kept = tuple(e for e in normalize_schedule(past) if e[0] < step)
    if kept and alpha_tau_at(kept, step, alpha, tau) == (float(alpha), float(tau)):
        return kept
    return kept + ((int(step), float(alpha), float(tau)),)


def check_batch_size(method: str, size: Any) -> str | None:
    """The paired methods need an even batch size >= 2 (two halves); None if ``size`` is fine."""
    problem = check_value("per_device_train_batch_size", size)
    if problem:
        return problem
    if method in PAIRED_METHODS and (size < 2 or size % 2):
        return f"must be even and >= 2 for method '{method}' (got {size!r})"
    return None


def check_tau0_in_range(tau0: float, tau_range: tuple[float, float]) -> str | None:
    """dynsdpb's tau0 must lie inside tau_range, which clamps its tau, so that dynsdpb with zero
    rates is exactly dlb. No other method reads tau_range (:func:`check_values` asks it of
    dynsdpb, and of a config whose method is not known)."""
    lo, hi = tau_range
    if not lo <= tau0 <= hi:
        return f"must satisfy 0 < low <= tau0 <= high (got {tuple(tau_range)!r}, tau0={tau0})"
    return None


def check_schedule_method(method: str | None, values: Mapping[str, Any]) -> tuple[str, str] | None:
    """Only the static-DLB methods follow a schedule."""
    if method is not None and values.get("schedule") and method not in SCHEDULED:
        return "schedule", f"only {' and '.join(SCHEDULED)} follow a schedule (method {method!r})"
    return None


def check_distinct(method: str | None, values: Mapping[str, Any], regression: bool = False) -> tuple[str, str] | None:
    """An arm must train what its name says, never exactly another arm: ``dynsdpb`` with both rates
    0 is static DLB, and on a ``regression`` task (whose term has no tau) so is ``lambda_alpha`` 0
    alone (``dlb_warmup``'s warm-up is kept off 0 by its bounds). ``(name, problem)`` or None."""
    if method == "dynsdpb" and values.get("lambda_alpha") == 0 and (regression or values.get("lambda_tau") == 0):
        if regression:
            return "lambda_alpha", ("lambda_alpha = 0 on a regression task makes dynsdpb train exactly dlb "
                                    "(its term has no tau); give it a non-zero rate")
        return "lambda_tau", ("lambda_alpha = lambda_tau = 0 makes dynsdpb train exactly dlb; "
                              "give it a non-zero rate")
    return None


def check_values(values: Mapping[str, Any], method: str | None = None) -> tuple[str, str] | None:
    """The first problem among ``values`` (config field name -> value) as ``(name, problem)``, or None.

    Checks ``method`` (from ``values`` or the argument), each known parameter present, the batch
    size against the method, tau0 against tau_range (dynsdpb's), and that the method is not another one in
    disguise (:func:`check_distinct`). Unknown names are ignored.
    """
    method = values.get("method", method)
    if method is not None and check_value("method", method):
        return "method", check_value("method", method)
    for name, value in values.items():
        if name in PARAMS or name in TRAINING_PARAMS:
            problem = (check_batch_size(method, value) if name == "per_device_train_batch_size" and method
                       else check_value(name, value))
            if problem:
                return name, problem
    if "tau0" in values and "tau_range" in values and (method is None or method in methods_using("tau_range")):
        problem = check_tau0_in_range(values["tau0"], values["tau_range"])
        if problem:
            return "tau_range", problem
    return check_schedule_method(method, values) or check_distinct(method, values)
