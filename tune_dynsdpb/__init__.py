"""tune-dynsdpb: sweeps for DynSDPB, dynamic self-distillation from the previous mini-batch.

The method lives in two short files: :mod:`tune_dynsdpb.losses` (the math) and
:mod:`tune_dynsdpb.sampler` (the batch stream and the soft-target cache).
"""

from .errors import UserError
from .losses import consistency_kl, consistency_mse, consistency_term, dynamic_alpha_tau, uncertainty_and_confidence
from .sampler import PreviousBatchSampler, SoftTargetCache
from .trainer import DynSDPBConfig, DynSDPBTrainer

__all__ = [
    "DynSDPBConfig", "DynSDPBTrainer", "PreviousBatchSampler", "SoftTargetCache", "UserError",
    "consistency_kl", "consistency_mse", "consistency_term", "dynamic_alpha_tau", "uncertainty_and_confidence",
    "load_task",
]


def __getattr__(name):  # load_task pulls in `datasets`; import it only when asked for
    if name == "load_task":
        from .data import load_task
        return load_task
    raise AttributeError(name)
