"""DynSDPB's loss: pure tensor functions, the method's one home for its math.

A training step t sees B samples. Its first B/2 were also in step t-1 (see
:class:`tune_dynsdpb.PreviousBatchSampler`), and step t-1's logits for them, ``z_prev``, are the
soft targets. With ``z_now`` this step's logits for the same samples::

    L = CE(all B samples)  +  1/|R| * sum_{i in R}  alpha_i * tau_i^2 * KL( softmax(z_prev_i / tau_i) || softmax(z_now_i / tau_i) )

R is the reused half (for a causal LM: every target token of the reused half, labels != -100).
The KL runs from the previous prediction (target, detached) to the current one; tau^2 keeps the
gradient scale independent of tau, as in Hinton et al.'s distillation. For a regression head
(num_labels = 1) the term is ``alpha_i * (y_now_i - y_prev_i)^2``.

How alpha_i and tau_i are chosen is the method:

- ``dlb``:      alpha_i = alpha0,  tau_i = tau0                     (static DLB, Shen et al. 2022)
- ``dlb_warmup``: as ``dlb``; the trainer leaves the term out during the first ``distill_warmup``
  of the steps, which is a schedule, not a change to the term itself
- ``dynsdpb``:  from the cached previous logits, no extra forward pass::

      p_i   = softmax(z_prev_i)
      u_i   = H(p_i) / log C                       uncertainty, in [0, 1]
      c_i   = p_i[y_i]                             discrimination: mass on the true label, in [0, 1]
      alpha_i = alpha0 * c_i ** lambda_alpha       lambda_alpha >= 0
      tau_i   = clamp(tau0 * (1 + lambda_tau * u_i), tau_min, tau_max)      lambda_tau > -1

  With ``granularity="batch"`` u and c are replaced by their means over R. With zero rates
  (lambda_alpha = lambda_tau = 0) alpha_i = alpha0 and tau_i = tau0 exactly, so static DLB is
  the zero-rate case of this family (tau0 must lie inside the clamp range, which the config
  checks). For regression there is no distribution: u = 0 and c_i = exp(-(y_prev_i - y_i)^2),
  so alpha shrinks where the previous prediction was far from the label.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .params import PARAMS, Granularity, Method
TAU_RANGE: tuple[float, float] = PARAMS["tau_range"].default  # the default clamp range, defined in params.py


def consistency_kl(z_now: torch.Tensor, z_prev: torch.Tensor, alpha: torch.Tensor | float,
                   tau: torch.Tensor | float) -> torch.Tensor:
    """``mean_i alpha_i * tau_i^2 * KL(softmax(z_prev_i/tau_i) || softmax(z_now_i/tau_i))``.

    Args:
        z_now: (N, C) current logits; gradients flow into these only.
        z_prev: (N, C) previous-step logits, the targets (detached here).
        alpha, tau: scalars or (N,) per-row weights and temperatures.
    Returns:
        A scalar; 0 when N == 0. Computed in float32 whatever the input dtype.
    """
    if z_now.shape[0] == 0:
        return z_now.float().sum() * 0.0
    tau = torch.as_tensor(tau, dtype=torch.float32, device=z_now.device)
    alpha = torch.as_tensor(alpha, dtype=torch.float32, device=z_now.device)
    t = tau.unsqueeze(-1) if tau.ndim else tau
    log_p_now = F.log_softmax(z_now.float() / t, dim=-1)
    log_p_prev = F.log_softmax(z_prev.detach().float() / t, dim=-1)
    kl = F.kl_div(log_p_now, log_p_prev, log_target=True, reduction="none").sum(-1)  # (N,)
    return (alpha * tau.square() * kl).mean()


def consistency_mse(y_now: torch.Tensor, y_prev: torch.Tensor, alpha: torch.Tensor | float) -> torch.Tensor:
    """``mean_i alpha_i * (y_now_i - y_prev_i)^2`` for regression heads.

    Args:
        y_now: (N,) or (N, 1) current predictions. y_prev: the same shape, previous step (detached).
        alpha: scalar or (N,).
    """
    if y_now.shape[0] == 0:
        return y_now.float().sum() * 0.0
    diff = y_now.float().reshape(-1) - y_prev.detach().float().reshape(-1)
    return (torch.as_tensor(alpha, dtype=torch.float32, device=y_now.device) * diff.square()).mean()


def uncertainty_and_confidence(z_prev: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized entropy ``u = H(softmax(z)) / log C`` and true-label probability ``c = softmax(z)[y]``.

    Args:
        z_prev: (N, C) logits; labels: (N,) class ids. Returns two (N,) float32 tensors in [0, 1].
    """
    log_p = F.log_softmax(z_prev.detach().float(), dim=-1)
    p = log_p.exp()
    num_classes = z_prev.shape[-1]
    u = -(p * log_p).sum(-1) / math.log(num_classes) if num_classes > 1 else torch.zeros_like(p[:, 0])
    c = p.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
    return u, c


def regression_confidence(y_prev: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Regression stand-ins for (u, c): ``u = 0`` and ``c = exp(-(y_prev - y)^2)``. Shapes (N,)."""
    c = torch.exp(-(y_prev.detach().float().reshape(-1) - labels.float().reshape(-1)).square())
    return torch.zeros_like(c), c


def dynamic_alpha_tau(u: torch.Tensor, c: torch.Tensor, *, alpha0: float, tau0: float, lambda_alpha: float,
                      lambda_tau: float, granularity: Granularity = "sample",
                      tau_range: tuple[float, float] = TAU_RANGE) -> tuple[torch.Tensor, torch.Tensor]:
    """``alpha = alpha0 * c^lambda_alpha``, ``tau = clamp(tau0 * (1 + lambda_tau * u), *tau_range)``.

    Args:
        u, c: (N,) uncertainty and discrimination from :func:`uncertainty_and_confidence`.
        granularity: "sample" keeps one value per row; "batch" uses the means of u and c.
    Returns:
        alpha, tau: (N,) float32. With zero rates they equal alpha0 and tau0 exactly
        (``x ** 0 == 1`` also for x == 0).
    """
    if granularity == "batch":
        u, c = u.mean().expand_as(u), c.mean().expand_as(c)
    elif granularity != "sample":
        raise ValueError(f"granularity: expected 'sample' or 'batch', got {granularity!r}")
    alpha = alpha0 * c.pow(lambda_alpha)
    tau = (tau0 * (1.0 + lambda_tau * u)).clamp(*tau_range)
    return alpha, tau


class Consistency(NamedTuple):
    """The consistency term of one step and the per-row quantities behind it, all (N,) but loss."""

    loss: torch.Tensor
    alpha: torch.Tensor
    tau: torch.Tensor
    u: torch.Tensor
    c: torch.Tensor


def consistency_term(z_now: torch.Tensor, z_prev: torch.Tensor, labels: torch.Tensor, *, method: Method,
                     alpha0: float, tau0: float, lambda_alpha: float = 0.0, lambda_tau: float = 0.0,
                     granularity: Granularity = "sample", tau_range: tuple[float, float] = TAU_RANGE,
                     regression: bool = False) -> Consistency:
    """The DLB / DynSDPB consistency term for the reused rows.

    Args:
        z_now: (N, C) current logits (or (N,) / (N, 1) predictions when ``regression``).
        z_prev: same shape, cached from the previous step.
        labels: (N,) true labels (class ids, or floats for regression); only dynsdpb reads them.
        method: "dlb" or "dlb_warmup" (static alpha0, tau0) or "dynsdpb" (alpha and tau from u and c).
    """
    if regression:
        u, c = regression_confidence(z_prev, labels)
    else:
        u, c = uncertainty_and_confidence(z_prev, labels)
    if method == "dynsdpb":
        alpha, tau = dynamic_alpha_tau(u, c, alpha0=alpha0, tau0=tau0, lambda_alpha=lambda_alpha,
                                       lambda_tau=lambda_tau, granularity=granularity, tau_range=tau_range)
    elif method in ("dlb", "dlb_warmup"):
        alpha, tau = torch.full_like(u, alpha0), torch.full_like(u, tau0)
    else:
        raise ValueError(f"method: the consistency term exists for 'dlb', 'dlb_warmup' and 'dynsdpb', not {method!r}")
    loss = consistency_mse(z_now, z_prev, alpha) if regression else consistency_kl(z_now, z_prev, alpha, tau)
    return Consistency(loss, alpha, tau, u, c)
