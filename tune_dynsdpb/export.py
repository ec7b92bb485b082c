"""``tune-dynsdpb export``: a sweep's best models into the MLflow Model Registry, and back out.

``export_sweep`` logs the best trial of each arm (weights and tokenizer from its checkpoint, no hub
references) as a transformers model in one MLflow run under the sweep's parent, and registers each
as a version of one registered model; every MLflow call goes through :mod:`tune_dynsdpb.tracking`
(``Registry``, ``download_model``):

* alias ``best-<arm>`` on each arm's version, ``champion`` on the winner (the best score, mode-aware,
  or the ``--arm`` asked for);
* version tags: sweep id, arm, metric name and value, seed, trial, task and data source;
* the registered model carries the task (``tune_dynsdpb.task``); exporting another task into the
  same name is refused before anything is logged.

Aliases are set only after every version exists (``champion`` last). If registration fails midway,
the aliases that still point at this export's versions are put back, those versions are deleted (and
the registered model, if this export created it and nothing else is in it) before the error is
raised; an alias a concurrent export has moved is left alone.

``export_folder`` writes a registered model (``models:/NAME@champion``) as a plain Hugging Face
folder that ``transformers.pipeline()`` loads. The registry is trusted for weights, never for code:
the MLmodel file is read and checked before anything loads (see :func:`check_flavor`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import transformers
import yaml
from transformers import (AutoConfig, AutoFeatureExtractor, AutoImageProcessor, AutoModelForCausalLM,
                          AutoModelForSequenceClassification, AutoTokenizer)
from transformers.utils import logging as hf_logging

from . import storage
from .data import load_task
from .errors import StoreError, UserError, one_line
from .files import staged_output
from .run import load_model
from .searching import replay_config
from .state import open_sweep
from .tracking import (TAG_PARENT, TAG_ROLE, TAG_SWEEP, Registry, SweepTracker, check_tracking_uri, download_model,
                       open_tracking_uri, redact_uri)

TAG_TASK = "tune_dynsdpb.task"
ALIAS_CHAMPION = "champion"


def pipeline_task(kind: str) -> str:
    """The transformers pipeline task of a task kind (regression heads are text-classification too)."""
    return "text-generation" if kind == "causal_lm" else "text-classification"


def input_example(task, n: int = 2) -> list:
    """``n`` real rows of the task's eval text: strings, or ``{"text", "text_pair"}`` for pairs."""
    rows = task.eval.select(range(min(n, len(task.eval))))
    if task.kind == "causal_lm":
        return [r["prompt"] for r in rows]
    fields = task.text_fields
    if len(fields) == 1:
        return [r[fields[0]] for r in rows]
    return [{"text": r[fields[0]], "text_pair": r[fields[1]]} for r in rows]


def load_checkpoint(path: str | Path, task, model_path: str):
    """(model, tokenizer) from a trial's HF Trainer checkpoint; LoRA adapters merged into the base."""
    path = Path(path)
    if (path / "adapter_config.json").exists():
        from peft import PeftModel  # an optional extra: only LoRA checkpoints need it

        base, tokenizer = load_model(model_path, task)
        model = PeftModel.from_pretrained(base, str(path)).merge_and_unload()
    else:
        cls = AutoModelForCausalLM if task.kind == "causal_lm" else AutoModelForSequenceClassification
        model = cls.from_pretrained(str(path))
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model.eval(), tokenizer


def _candidates(state, task: str, arm: str | None, where: str) -> tuple[dict[str, dict], str]:
    """Each arm's best (arms with a scored, never a failed, trial) and the winner's name."""
    scored = {m: b.model_dump() | {"metric": state.tasks[task].metric} for m, b in state.scored(task).items()}
    if not scored:
        raise UserError(f"{where}: task {task} of the sweep has no finished trial; nothing to export")
    if arm is not None:
        if arm not in state.methods:
            raise UserError(f"--arm: the sweep has no arm {arm!r} (arms: {', '.join(state.methods)})")
        if arm not in scored:
            raise UserError(f"--arm: arm {arm!r} of the sweep has no finished trial")
        return scored, arm
    pick = max if state.tasks[task].mode == "max" else min
    return scored, pick(scored, key=lambda m: scored[m]["score"])


def export_sweep(sweep_dir: str | Path, name: str, arm: str | None = None,
                 tracking_uri: str | None = None, task: str | None = None) -> dict[str, Any]:
    """Registers each arm's best model as a version of ``name``; returns {arm: version, "champion": arm}.
    Each best checkpoint is read from the sweep's storage path (a local folder, or downloaded from a
    URI into a temporary folder)."""
    out = Path(sweep_dir).resolve()
    state = open_sweep(out)
    if not name or "'" in name or '"' in name:
        raise UserError(f"--name: give a registry name without quotes (got {name!r})")
    task_name = state.pick_task(task)
    best, winner = _candidates(state, task_name, arm, str(out))
    for m, b in best.items():
        if not b.get("checkpoint") or not storage.is_dir(b["checkpoint"]):
            raise UserError(f"{out}: the best checkpoint of arm {m!r} is missing: "
                            f"{storage.redact(str(b.get('checkpoint')))}")
    uri = open_tracking_uri(state.tracking_uri, tracking_uri)
    check_tracking_uri(uri)
    spec = state.sweep_spec()
    ts = next(t for t in spec.task_specs() if t.task == task_name)
    task = load_task(ts.task, state.tasks[task_name].data_dir or ts.data_dir, max_train_samples=ts.max_train_samples,
                     max_eval_samples=ts.max_eval_samples, seed=spec.seed)
    registry = Registry(uri)
    existed = registry.check_name(name, task.name)  # before anything is logged

    tracker = SweepTracker(uri, spec.name, state.sweep_id)
    ptask = pipeline_task(task.kind)
    model_config = {"function_to_apply": "none"} if task.kind == "regression" else None
    example = input_example(task)
    run_id = registry.start_run(tracker.experiment_id, f"export-{name}",
                                {TAG_SWEEP: state.sweep_id, TAG_ROLE: "export", TAG_PARENT: tracker.task_run(task_name)})
    created: list[str] = []
    logged: list[str] = []
    aliases = {f"best-{m}": m for m in best} | {ALIAS_CHAMPION: winner}
    before: dict[str, str] = {}
    made = False  # whether this export created the registered model (only then may its roll-back delete it)
    try:
        if not existed:
            existed = registry.create_model(name, task.name, {"tune_dynsdpb.pipeline_task": ptask})
            made = not existed
        if existed:  # same task (checked above), or an empty model without the tag yet
            registry.tag_model(name, TAG_TASK, task.name)
        before = registry.alias_versions(name, aliases)  # what to put back, read before any change
        versions = {}
        with _no_progress_bars():  # an error stays the only line on stderr
            for m, b in best.items():
                with storage.local_copy(b["checkpoint"], prefix="dynsdpb-export-") as folder:
                    model, tokenizer = load_checkpoint(folder, task, state.model_path)
                output = _predict(transformers.pipeline(ptask, model=model, tokenizer=tokenizer), example,
                                  model_config)
                try:
                    model_uri, model_id = registry.log_transformers_model(
                        run_id, f"model-{m}", model, tokenizer, ptask, example, output, model_config)
                except Exception as e:  # noqa: BLE001 - the artifact store failed (HTTP 5xx, S3 down, ...)
                    raise StoreError(f"MLflow artifact store of {redact_uri(uri)}: cannot upload model-{m} of "
                                     f"{name!r}: {one_line(e)}; nothing was registered: run the same command "
                                     "again") from None
                logged.append(model_id)
                config = replay_config(b) if b.get("config") else {}  # a pbt arm's: with its learned schedule
                tags = {"tune_dynsdpb.sweep_id": state.sweep_id, "tune_dynsdpb.arm": m,
                        "tune_dynsdpb.metric": b["metric"], "tune_dynsdpb.metric_value": repr(float(b["score"])),
                        "tune_dynsdpb.seed": str(config.get("seed", spec.seed)), TAG_TASK: task.name,
                        "tune_dynsdpb.data_source": str(task.source)[:5000],
                        "tune_dynsdpb.trial_id": str(b.get("trial_id")),
                        "tune_dynsdpb.trial_run_id": str(b.get("run_id")), "tune_dynsdpb.export_run_id": run_id,
                        "tune_dynsdpb.config": _json(config)}
                version = registry.create_version(name, model_uri, run_id, tags, model_id)
                created.append(version)
                versions[m] = version
        # aliases only once every version exists: an alias never points at a half-made export;
        # champion goes last, so a killed export leaves the old champion in place
        for alias, m in aliases.items():
            registry.set_alias(name, alias, versions[m])
    except BaseException:
        registry.rollback(name, created, before, existed=not made)
        registry.discard(run_id, logged)
        raise
    registry.end_run(run_id)
    return {**versions, ALIAS_CHAMPION: winner, "run_id": run_id}


def _predict(pipe, example: list, model_config: dict | None):
    """The pipeline's answer to the input example, in the shape MLflow's pyfunc returns it."""
    out = pipe(example, **(model_config or {}))
    if pipe.task == "text-generation":
        return [r[0]["generated_text"] if isinstance(r, list) else r["generated_text"] for r in out]
    return pd.DataFrame([r[0] if isinstance(r, list) else r for r in out])


def _json(config: dict) -> str:
    return json.dumps(config, sort_keys=True, default=str)[:5000]


# The flavor keys that name a class to instantiate: each must be a class of the transformers package.
_CLASS_KEYS = ("instance_type", "pipeline_model_type", "tokenizer_type", "feature_extractor_type",
               "image_processor_type", "processor_type")
# Flavor settings that make MLflow fetch or build weights elsewhere (hub, a local base, an adapter).
_REFUSED_KEYS = {"local_base_model_path": "a base model outside the artifacts",
                 "peft_adaptor": "a PEFT adapter over a base model outside the artifacts"}


def _transformers_class(name, uri: str, what: str, base: str | None = None):
    """The transformers class called ``name``, found by attribute look-up on the ``transformers``
    package only (nothing else is ever imported); a one-line UserError for anything else."""
    refused = UserError(f"--model: {uri}: {what} class {name!r} is not in the transformers package; "
                        "refusing to load it")
    if not isinstance(name, str) or not name.isidentifier():
        raise refused
    cls = getattr(transformers, name, None)
    module = getattr(cls, "__module__", "") or ""
    if not isinstance(cls, type) or not (module == "transformers" or module.startswith("transformers.")) \
            or (base is not None and not issubclass(cls, getattr(transformers, base))):
        raise refused
    return cls


def check_flavor(mlmodel: dict, uri: str) -> dict:
    """The transformers flavor of an MLmodel file, checked: every class it names is a class of the
    ``transformers`` package (looked up, never imported from elsewhere), and the weights are in the
    artifacts. Raises a one-line UserError otherwise."""
    flavors = (mlmodel or {}).get("flavors") or {}
    conf = flavors.get("transformers")
    if not isinstance(conf, dict):
        raise UserError(f"--model: {uri} is not a transformers model (flavors: {', '.join(flavors) or 'none'})")
    for key, why in _REFUSED_KEYS.items():
        if conf.get(key):
            raise UserError(f"--model: {uri}: its transformers flavor loads {why} ({key}); refusing to load it")
    if not conf.get("model_binary"):
        raise UserError(f"--model: {uri}: holds no model weights (it would load them from "
                        f"{conf.get('source_model_name')!r} on the hub); refusing to load it")
    _transformers_class(conf.get("pipeline_model_type"), uri, "model", "PreTrainedModel")
    if conf.get("instance_type") is not None:
        _transformers_class(conf.get("instance_type"), uri, "pipeline", "Pipeline")
    for key in _CLASS_KEYS[2:]:
        if conf.get(key) is not None:
            base = "PreTrainedTokenizerBase" if key == "tokenizer_type" else None
            _transformers_class(conf[key], uri, key.removesuffix("_type").replace("_", " "), base)
    components = conf.get("components") or []
    if not isinstance(components, list) or any(c not in ("tokenizer", "feature_extractor", "image_processor")
                                               for c in components):
        raise UserError(f"--model: {uri}: unexpected components {components!r}; refusing to load it")
    return conf


def _no_custom_code(folder: Path, uri: str) -> None:
    """Refuses a config that asks for code shipped with the model (``auto_map``)."""
    for name in ("config.json", "tokenizer_config.json", "preprocessor_config.json"):
        f = folder / name
        if f.is_file():
            try:
                data = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise UserError(f"--model: {uri}: unreadable {name}: {one_line(e)}") from None
            if isinstance(data, dict) and data.get("auto_map"):
                raise UserError(f"--model: {uri}: {name} asks for code shipped with the model (auto_map); "
                                "refusing to load it")


def load_registered(local: Path, uri: str):
    """(model, {component: object}) from downloaded artifacts, after :func:`check_flavor`; every
    load goes through the Auto classes with ``trust_remote_code=False``."""
    try:
        mlmodel = yaml.safe_load((local / "MLmodel").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UserError(f"--model: {uri}: no readable MLmodel file: {one_line(e)}") from None
    conf = check_flavor(mlmodel if isinstance(mlmodel, dict) else {}, uri)
    weights = local / str(conf["model_binary"])
    if not weights.is_dir() or weights.resolve().parent != local.resolve():
        raise UserError(f"--model: {uri}: the weights folder {conf['model_binary']!r} is missing")
    _no_custom_code(weights, uri)
    autos = {"text-generation": AutoModelForCausalLM, "text-classification": AutoModelForSequenceClassification}
    auto = autos.get(conf.get("task"))
    if auto is None:
        raise UserError(f"--model: {uri}: pipeline task {conf.get('task')!r} is not one tune-dynsdpb exports "
                        f"({', '.join(autos)})")
    loaders = {"tokenizer": AutoTokenizer, "feature_extractor": AutoFeatureExtractor,
               "image_processor": AutoImageProcessor}
    try:
        AutoConfig.from_pretrained(str(weights), trust_remote_code=False)
        model = auto.from_pretrained(str(weights), trust_remote_code=False)
        parts = {}
        for name in conf.get("components") or []:
            folder = local / "components" / name
            _no_custom_code(folder, uri)
            parts[name] = loaders[name].from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"--model: cannot load {uri}: {one_line(e)}") from None
    if type(model).__name__ != conf["pipeline_model_type"]:
        raise UserError(f"--model: {uri}: the weights hold a {type(model).__name__}, the MLmodel file says "
                        f"{conf['pipeline_model_type']}")
    return model, parts


@contextlib.contextmanager
def _no_progress_bars():
    """No download/loading/writing bars on stderr for the block: an error stays the only line there."""
    saved, was = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"), hf_logging.is_progress_bar_enabled()
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    hf_logging.disable_progress_bar()
    # "no model card / license on the hub" (a local model); "waiting up to 300 s for the version"
    notes = [logging.getLogger(n) for n in ("mlflow.transformers", "mlflow.store.model_registry.abstract_store")]
    levels = [n.level for n in notes]
    for n in notes:
        n.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for n, level in zip(notes, levels):
            n.setLevel(level)
        if saved is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = saved
        if was:
            hf_logging.enable_progress_bar()


def export_folder(model_uri: str, out: str | Path, tracking_uri: str | None = None) -> Path:
    """Writes a registered transformers model (e.g. ``models:/NAME@champion``) as a plain Hugging
    Face folder (model + tokenizer), staged beside ``out`` and renamed into place.

    The registry is trusted for weights, never for code: the artifacts are downloaded, the MLmodel
    file's transformers flavor is checked (:func:`check_flavor`: every class it names must be a
    class of the ``transformers`` package; no hub, adapter or outside base model; no ``auto_map``),
    and only then are the weights loaded, through the Auto classes with ``trust_remote_code=False``.
    ``mlflow.transformers.load_model`` (which imports what the MLmodel file names) is not used."""
    out = Path(out).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out: {out} exists and is not empty")
    with tempfile.TemporaryDirectory(prefix="dynsdpb-export-") as tmp, _no_progress_bars():
        local = download_model(model_uri, tmp, tracking_uri)
        model, parts = load_registered(local, model_uri)
        with staged_output(out, flag="--out") as staged:
            model.save_pretrained(staged)
            for part in parts.values():
                part.save_pretrained(staged)
    return out


__all__ = ["export_sweep", "export_folder", "check_flavor", "load_registered", "input_example", "load_checkpoint",
           "pipeline_task"]
