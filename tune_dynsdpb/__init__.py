"""tune-dynsdpb: sweeps for DynSDPB, dynamic self-distillation from the previous mini-batch.

The method lives in two short files: :mod:`tune_dynsdpb.losses` (the math) and
:mod:`tune_dynsdpb.sampler` (the batch stream and the soft-target cache).

The names below load on first use (PEP 562), so that ``import tune_dynsdpb.results`` (the result
keys, which Ray workers and the driver's callbacks read) does not import torch and transformers.
"""

from .errors import UserError

__all__ = [
    "DynSDPBConfig", "DynSDPBTrainer", "PreviousBatchSampler", "SoftTargetCache", "UserError",
    "consistency_kl", "consistency_mse", "consistency_term", "dynamic_alpha_tau", "uncertainty_and_confidence",
    "load_task",
]


def __getattr__(name):
    if name in ("consistency_kl", "consistency_mse", "consistency_term", "dynamic_alpha_tau",
                "uncertainty_and_confidence"):
        from . import losses  # (PEP 562: each name imports its module on first use)
        return getattr(losses, name)
    if name in ("PreviousBatchSampler", "SoftTargetCache"):
        from . import sampler  # (PEP 562)
        return getattr(sampler, name)
    if name in ("DynSDPBConfig", "DynSDPBTrainer"):
        from . import trainer  # (PEP 562; torch and transformers, ~5 s)
        return getattr(trainer, name)
    if name == "load_task":  # pulls in `datasets`
        from .data import load_task  # (PEP 562; see the line above)
        return load_task
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
