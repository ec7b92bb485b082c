"""``tune-dynsdpb``: train one model, sweep, compare arms, export the winner.

Bad input exits with status 2 and one line on stderr naming the flag, field or file; a training
run that diverges (a non-finite loss, gradient norm or eval loss) exits with status 1 and one line.
Nothing half-written is left behind (outputs are staged beside their target and renamed into place).

Each command's module is imported when the command runs: ``train`` pulls in torch and transformers
(and peft, which transformers loads when it is installed: about 4.4 s on 2 cores); ``compare``,
``export``, ``sweep`` and ``validate`` Ray Tune and MLflow as well (about 0.5 s and 0.9 s more),
none of which ``--help`` and a bad flag need; ``experiment`` is imported for ``set_ray_env`` only
once the command is known.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from . import params
from .errors import StoreError, UserError

# Config fields as the CLI spells them, so errors name the flag the user typed (from params.py).
FLAGS = {"method": "--method", **{p.name: p.flag for p in (*params.PARAMS.values(), *params.TRAINING_PARAMS.values())}}


def fail(message: str) -> int:
    field, sep, rest = message.partition(": ")
    if sep and field in FLAGS:
        message = f"{FLAGS[field]}: {rest}"
    print(f"tune-dynsdpb: error: {message}", file=sys.stderr)
    return 2


def _method_args(p: argparse.ArgumentParser) -> None:
    """--method and one flag per method parameter, all from :mod:`tune_dynsdpb.params`. The values
    are checked by :func:`tune_dynsdpb.run.fine_tune` (not by argparse), so a changed bound there is
    followed here."""
    g = p.add_argument_group("method")
    g.add_argument("--method", choices=list(params.METHODS), default=params.DEFAULT_METHOD, help=params.METHOD_HELP)
    for spec in params.PARAMS.values():
        kwargs: dict = {"dest": spec.name, "default": spec.default, "help": f"{spec.help} ({spec.rule})"}
        if spec.choices is not None:
            kwargs.update(choices=list(spec.choices), help=spec.help)
        elif spec.type is tuple:
            kwargs.update(type=float, nargs=2, metavar=("LOW", "HIGH"))
        elif spec.type is list:  # the schedule
            kwargs.update(type=params.parse_schedule_entry, nargs="+", metavar="STEP:ALPHA:TAU")
        else:
            kwargs.update(type=spec.type, metavar=_metavar(spec))
        g.add_argument(spec.flag, **kwargs)


def _metavar(spec: params.Param) -> str:
    return spec.flag.lstrip("-").replace("-", "_").upper()


def _training_arg(g, name: str, **kwargs) -> None:
    """A training number whose flag, default and help come from params.TRAINING_PARAMS."""
    spec = params.TRAINING_PARAMS[name]
    g.add_argument(spec.flag, dest=name, type=spec.type, default=spec.default, help=f"{spec.help} ({spec.rule})",
                   metavar=_metavar(spec), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tune-dynsdpb", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune one model, no Ray")
    t.add_argument("--task", required=True, help="rte, sst2, mrpc, cola, stsb, qqp, mnli, qnli, wnli, boolq, cb, "
                                                 "copa, superglue-rte, gsm8k, custom, qa-jsonl")
    t.add_argument("--data-dir", help="folder in the GLUE/SuperGLUE release layout (default: the hub)")
    t.add_argument("--train-file", help="custom tasks: a CSV/TSV/JSONL file")
    t.add_argument("--eval-file", help="custom tasks: a CSV/TSV/JSONL file")
    t.add_argument("--text-fields", nargs="+", help="custom tasks: 1 or 2 text columns")
    t.add_argument("--label-field", help="custom tasks: the label column")
    t.add_argument("--model", required=True, help="local folder, installed model package, or hub id")
    t.add_argument("--output-dir", required=True, type=Path)
    _method_args(t)
    g = t.add_argument_group("training")
    for name in params.TRAINING_PARAMS:
        _training_arg(g, name)
    g.add_argument("--max-train-samples", type=int)
    g.add_argument("--max-eval-samples", type=int)
    g.add_argument("--eval-steps", type=int, help="evaluate every N steps (default: every epoch)")
    g.add_argument("--logging-steps", type=int, default=10)
    g.add_argument("--grad-norm-log-steps", type=int, default=0, help="log per-layer gradient norms every N steps")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--lora-r", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    g.add_argument("--lora-target-modules", nargs="+")
    g.add_argument("--trust-remote-code", action="store_true", help="run code shipped with the model (off by default)")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sweep", help="search every arm with Ray Tune + Optuna, tracked in MLflow")
    s.add_argument("spec", nargs="?", help="sweep file (search_spaces/*.yaml); not needed with --resume")
    s.add_argument("--data-dir", help="folder in the GLUE/SuperGLUE layout (overrides the file's data_dir)")
    s.add_argument("--methods", nargs="+", help="arms to run (default: the file's methods)")
    s.add_argument("--num-samples", type=int, help="trials per arm (default: the file's budget)")
    s.add_argument("--ray-address", help="join an existing Ray cluster, e.g. 'auto' or ray://host:10001")
    s.add_argument("--tracking-uri", help="MLflow tracking server (default: SQLite in the output folder)")
    s.add_argument("--output-dir", type=Path, help="sweep folder (default: runs/<name>)")
    s.add_argument("--storage-path", help="where Tune keeps trials and checkpoints (default: OUT/ray); on a "
                                          "multi-node cluster a shared path: NFS, s3://bucket/x, gs://bucket/x")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the sweep file, e.g. --set budget.num_samples=16 --set model=/path")
    s.add_argument("--resume", action="store_true", help="continue the interrupted sweep in --output-dir")
    s.add_argument("--no-progress", action="store_true", help="no live table (for a job's log: the header and the summary still print)")
    s.add_argument("--verbose", action="store_true", help="show Ray's, transformers' and MLflow's own output")
    s.set_defaults(func=cmd_sweep)

    v = sub.add_parser("validate", help="check a sweep file, its data and model with one training step; no Ray")
    v.add_argument("spec", help="sweep file")
    v.add_argument("--data-dir", help="folder in the GLUE/SuperGLUE layout (overrides the file's data_dir)")
    v.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    v.set_defaults(func=cmd_validate)

    c = sub.add_parser("compare", help="re-run each arm's best config over seeds; report with paired tests")
    c.add_argument("sweep_dir", type=Path, help="the sweep's --output-dir")
    c.add_argument("--seeds", type=int, default=5, help="runs per arm, seeds spec.seed .. spec.seed+K-1 (default 5)")
    c.add_argument("--budget", choices=["epochs", "compute"], default="epochs",
                   help="epochs: each best config's epochs; compute: vanilla's doubled (equal sample-passes)")
    c.add_argument("--methods", nargs="+", help="arms to re-run (default: every arm with a finished trial)")
    c.add_argument("--task", dest="tasks", nargs="+", help="tasks to re-run (default: every task of the sweep)")
    c.add_argument("--grad-norm-steps", type=int, help="log per-layer gradient norms every N steps "
                                                       "(default: at every evaluation; 0: off)")
    c.add_argument("--ray-address", help="join an existing Ray cluster, e.g. 'auto'")
    c.add_argument("--tracking-uri", help="the sweep's tracking store, when its saved URI is redacted (a password)")
    c.set_defaults(func=cmd_compare)

    e = sub.add_parser("export", help="register the sweep's best models in MLflow, or write one as a HF folder",
                       description="tune-dynsdpb export SWEEP_DIR --name NAME [--arm ARM] | "
                                   "tune-dynsdpb export --model models:/NAME@champion --out DIR")
    e.add_argument("sweep_dir", nargs="?", type=Path, help="the sweep's --output-dir (to register its models)")
    e.add_argument("--name", help="registered model name in the MLflow Model Registry")
    e.add_argument("--arm", help="make this arm's best the champion (default: the best score of all arms)")
    e.add_argument("--task", help="the task whose models to register (needed when the sweep has several)")
    e.add_argument("--model", help="a model URI to write out, e.g. models:/NAME@champion")
    e.add_argument("--out", type=Path, help="with --model: new (or empty) folder for the Hugging Face files")
    e.add_argument("--tracking-uri", help="MLflow tracking/registry URI (default: the sweep's; with --model: "
                                          "$MLFLOW_TRACKING_URI)")
    e.set_defaults(func=cmd_export)
    return parser


def cmd_compare(a: argparse.Namespace) -> int:
    from .compare import run_compare  # here: each command's module when it runs (Ray Tune, MLflow: ~1.4 s)

    report = run_compare(a.sweep_dir, seeds=a.seeds, budget=a.budget, methods=a.methods, tasks=a.tasks,
                         ray_address=a.ray_address, tracking_uri=a.tracking_uri, grad_norm_steps=a.grad_norm_steps)
    pages = sorted(p for p in report.rglob("*.html"))
    print("report: " + ", ".join(str(p) for p in pages))
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from .export import export_folder, export_sweep  # here: see cmd_compare

    if a.model is not None:
        if a.sweep_dir is not None or a.name or a.arm or a.task:
            raise UserError("--model: writes a registered model out; give it with --out only "
                            "(no SWEEP_DIR, --name, --arm or --task)")
        if a.out is None:
            raise UserError("--model: needs --out DIR")
        out = export_folder(a.model, a.out, tracking_uri=a.tracking_uri)
        print(f"{a.model} -> {out}")
        return 0
    if a.sweep_dir is None or not a.name:
        raise UserError("export: give SWEEP_DIR --name NAME, or --model URI --out DIR")
    if a.out is not None:
        raise UserError("--out: only with --model")
    done = export_sweep(a.sweep_dir, a.name, arm=a.arm, tracking_uri=a.tracking_uri, task=a.task)
    champion = done.pop("champion")
    done.pop("run_id")
    for arm, version in done.items():
        print(f"{a.name} version {version}: {arm} (alias best-{arm}{', champion' if arm == champion else ''})")
    print(f"load it with: models:/{a.name}@champion")
    return 0


def cmd_sweep(a: argparse.Namespace) -> int:
    """Exit 0 when every arm has a scored trial, 1 (naming the arms and why) when one has none."""
    from .console import arm_problems  # here: see cmd_compare
    from .sweep import run_sweep  # here: see cmd_compare

    state = run_sweep(a.spec, output_dir=a.output_dir, data_dir=a.data_dir, methods=a.methods,
                      num_samples=a.num_samples, overrides=a.overrides, ray_address=a.ray_address,
                      tracking_uri=a.tracking_uri, storage_path=a.storage_path, resume=a.resume,
                      progress=not a.no_progress, verbose=a.verbose)
    problems = arm_problems(state)
    for line in problems:
        print(f"tune-dynsdpb: no scored trial: {line}", file=sys.stderr)
    return 1 if problems else 0


def cmd_validate(a: argparse.Namespace) -> int:
    from .validate import validate  # here: see cmd_compare

    for line in validate(a.spec, data_dir=a.data_dir, overrides=a.overrides):
        print(line)
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    """Exit 0 with the model and metrics.json in --output-dir; 1 (one line) when training diverged."""
    from .run import fine_tune  # here: torch, transformers (and peft, which they load): ~4.4 s that --help does not need
    from .trainer import TrainingDiverged  # here: see the line above

    values = {name: getattr(a, name) for name in (*params.PARAMS, *params.TRAINING_PARAMS)}
    data = {k: getattr(a, k) for k in ("data_dir", "train_file", "eval_file", "text_fields", "label_field",
                                       "max_train_samples", "max_eval_samples")}
    lora = ({"r": a.lora_r, "alpha": 2 * a.lora_r, "target_modules": a.lora_target_modules}
            if a.lora_r or a.lora_target_modules else None)  # fine_tune refuses modules without a rank
    try:
        record = fine_tune(a.output_dir, task=a.task, model=a.model, method=a.method, values=values, data=data,
                           eval_steps=a.eval_steps, logging_steps=a.logging_steps,
                           grad_norm_log_steps=a.grad_norm_log_steps, seed=a.seed, bf16=a.bf16, fp16=a.fp16,
                           lora=lora, trust_remote_code=a.trust_remote_code, say=print)
    except TrainingDiverged as e:  # the staged output is gone: no model, no metrics.json
        print(f"tune-dynsdpb: error: {e}", file=sys.stderr)
        return 1
    print(f"{record['metric']} = {record['score']}; model and metrics.json in {a.output_dir}")
    return 0


def _shutdown_ray() -> None:
    """After an interrupt, Ray is shut down now, deaf to a second Ctrl-C or SIGTERM (at exit it
    would be stopped halfway, and the exit status lost)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        ray.shutdown()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _exit_on_signal(code: int) -> None:
    """The command's work is done and saved: a Ctrl-C or SIGTERM from now on ends the process at
    once with the command's exit status (left to Python, it would interrupt Ray's shutdown or the
    interpreter's exit with a traceback, and exit -2)."""
    def end(signum, frame):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, end)


def main(argv: list[str] | None = None) -> int:
    """The command line. Run as a program (``argv`` None: the console script, ``python -m``), a Ray
    it started is shut down before it returns, and a late Ctrl-C ends it with the command's exit
    status (:func:`_exit_on_signal`)."""
    args = build_parser().parse_args(argv)
    if args.command in ("sweep", "compare"):  # before anything imports ray (it reads these once)
        from .experiment import set_ray_env  # here: see the comment above
        set_ray_env(args.ray_address)
    try:
        code = args.func(args) or 0
        if argv is None:
            _exit_on_signal(code)
            _shutdown_ray()
        return code
    except UserError as e:
        return fail(str(e))
    except StoreError as e:  # a store failed midway: what was made is kept; the same command resumes
        print(f"tune-dynsdpb: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print(f"tune-dynsdpb: interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        _shutdown_ray()
        return 130


if __name__ == "__main__":
    sys.exit(main())
