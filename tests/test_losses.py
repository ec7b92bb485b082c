"""The loss math against hand-written references."""

import math

import pytest
import torch

from tune_dynsdpb.losses import (consistency_kl, consistency_mse, consistency_term, dynamic_alpha_tau,
                                 uncertainty_and_confidence)


def reference_kl(z_now, z_prev, alpha, tau):
    """Row by row, in float64, straight from the definition: sum_k p_k log(p_k / q_k)."""
    total = 0.0
    for i in range(z_now.shape[0]):
        a = float(alpha[i]) if torch.is_tensor(alpha) and alpha.ndim else float(alpha)
        t = float(tau[i]) if torch.is_tensor(tau) and tau.ndim else float(tau)
        p = torch.softmax(z_prev[i].double() / t, -1)  # previous: the target
        q = torch.softmax(z_now[i].double() / t, -1)   # current
        total += a * t * t * float((p * (p / q).log()).sum())
    return total / z_now.shape[0]


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 5, generator=g) * 2, torch.randn(6, 5, generator=g) * 2


def test_kl_matches_reference_with_tau_squared_and_direction(logits):
    z_now, z_prev = logits
    alpha, tau = torch.tensor([0.5, 1, 2, 0, 1.5, 1]), torch.tensor([1, 2, 3, 4, 0.5, 1.0])
    assert consistency_kl(z_now, z_prev, alpha, tau).item() == pytest.approx(reference_kl(z_now, z_prev, alpha, tau), rel=1e-5)
    # tau^2 scaling: alpha=1 at tau=2 equals 4x the plain KL at tau=2
    plain = reference_kl(z_now, z_prev, 1.0, 2.0) / 4
    assert consistency_kl(z_now, z_prev, 1.0, 2.0).item() == pytest.approx(4 * plain, rel=1e-5)
    # direction: KL(prev || now) != KL(now || prev) on asymmetric inputs
    swapped = reference_kl(z_prev, z_now, 1.0, 2.0)
    assert consistency_kl(z_now, z_prev, 1.0, 2.0).item() != pytest.approx(swapped, rel=1e-3)


def test_zero_at_identical_logits(logits):
    z, _ = logits
    assert consistency_kl(z, z.clone(), 1.0, 3.0).item() == pytest.approx(0.0, abs=1e-6)
    assert consistency_mse(z[:, 0], z[:, 0].clone(), 1.0).item() == 0.0


def test_gradients_flow_into_current_logits_only(logits):
    z_now, z_prev = (t.clone().requires_grad_() for t in logits)
    consistency_term(z_now, z_prev, torch.tensor([0, 1, 2, 3, 4, 0]), method="dynsdpb", alpha0=1, tau0=2,
                     lambda_alpha=1, lambda_tau=0.5).loss.backward()
    assert z_now.grad is not None and z_now.grad.abs().sum() > 0
    assert z_prev.grad is None


def test_dynsdpb_with_zero_rates_equals_dlb(logits):
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    grads = {}
    for method in ("dlb", "dynsdpb"):
        z = logits[0].clone().requires_grad_()
        out = consistency_term(z, logits[1], labels, method=method, alpha0=0.7, tau0=2.5, lambda_alpha=0.0,
                               lambda_tau=0.0)
        out.loss.backward()
        grads[method] = (out.loss.detach(), z.grad)
    assert torch.equal(grads["dlb"][0], grads["dynsdpb"][0])
    assert torch.equal(grads["dlb"][1], grads["dynsdpb"][1])


def test_equal_per_sample_weights_equal_scalars(logits):
    z_now, z_prev = logits
    per_row = consistency_kl(z_now, z_prev, torch.full((6,), 0.8), torch.full((6,), 2.0))
    assert per_row.item() == pytest.approx(consistency_kl(z_now, z_prev, 0.8, 2.0).item(), rel=1e-6)


def test_uncertainty_and_confidence():
    z = torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]])
    u, c = uncertainty_and_confidence(z, torch.tensor([2, 0]))
    assert u.tolist() == pytest.approx([1.0, 0.0], abs=1e-6)
    assert c.tolist() == pytest.approx([0.25, 1.0], abs=1e-6)


def test_dynamic_alpha_tau_formulas_clamp_and_batch_mode():
    u, c = torch.tensor([0.0, 0.5, 1.0]), torch.tensor([0.25, 1.0, 0.0])
    alpha, tau = dynamic_alpha_tau(u, c, alpha0=2.0, tau0=3.0, lambda_alpha=2.0, lambda_tau=1.0)
    assert alpha.tolist() == pytest.approx([2 * 0.0625, 2.0, 0.0])
    assert tau.tolist() == pytest.approx([3.0, 4.5, 6.0])
    _, tau = dynamic_alpha_tau(u, c, alpha0=1, tau0=3.0, lambda_alpha=0, lambda_tau=5.0, tau_range=(0.1, 10.0))
    assert tau.max().item() == 10.0
    alpha, tau = dynamic_alpha_tau(u, c, alpha0=1, tau0=2.0, lambda_alpha=1, lambda_tau=1, granularity="batch")
    assert torch.allclose(alpha, torch.full((3,), c.mean().item()))
    assert torch.allclose(tau, torch.full((3,), 2.0 * 1.5))
    # zero rates: exactly alpha0 and tau0, also where c == 0
    alpha, tau = dynamic_alpha_tau(u, c, alpha0=0.3, tau0=4.0, lambda_alpha=0, lambda_tau=0)
    assert torch.equal(alpha, torch.full((3,), 0.3)) and torch.equal(tau, torch.full((3,), 4.0))


def test_regression_term():
    y_now, y_prev, y = torch.tensor([1.0, 2.0]), torch.tensor([1.5, 2.0]), torch.tensor([1.5, 0.0])
    out = consistency_term(y_now, y_prev, y, method="dynsdpb", alpha0=2.0, tau0=1.0, lambda_alpha=1.0, regression=True)
    c = torch.exp(-(y_prev - y) ** 2)
    assert out.loss.item() == pytest.approx(float((2.0 * c * (y_now - y_prev) ** 2).mean()))
    dlb = consistency_term(y_now, y_prev, y, method="dlb", alpha0=2.0, tau0=1.0, regression=True)
    assert dlb.loss.item() == pytest.approx(2.0 * 0.25 / 2)


def test_causal_lm_rows_skip_masked_tokens():
    """The trainer compares only target tokens (labels != -100), shifted by one position."""
    from tune_dynsdpb.trainer import _target_rows
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 7, generator=g)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, 3, 6]])
    rows, row_labels, counts = _target_rows(logits, labels, causal_lm=True)
    assert counts.tolist() == [2, 4]
    assert row_labels.tolist() == [3, 4, 1, 2, 3, 6]
    assert torch.equal(rows[0], logits[0, 1]) and torch.equal(rows[2], logits[1, 0])
    # changing the logits at a masked position changes nothing
    other = logits.clone()
    other[0, 0] += 100
    other[0, 4] += 100
    assert torch.equal(_target_rows(other, labels, True)[0], rows)


def test_empty_rows_give_zero():
    assert consistency_kl(torch.zeros(0, 3), torch.zeros(0, 3), 1.0, 2.0).item() == 0.0
    assert not math.isnan(consistency_mse(torch.zeros(0), torch.zeros(0), 1.0).item())


def test_dlb_warmup_term_is_dlbs(logits):
    """dlb_warmup changes when the term applies (in the trainer), not the term itself."""
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    dlb = consistency_term(logits[0], logits[1], labels, method="dlb", alpha0=0.7, tau0=2.5)
    warm = consistency_term(logits[0], logits[1], labels, method="dlb_warmup", alpha0=0.7, tau0=2.5)
    assert torch.equal(dlb.loss, warm.loss) and torch.equal(dlb.tau, warm.tau)
    with pytest.raises(ValueError, match="vanilla"):
        consistency_term(logits[0], logits[1], labels, method="vanilla", alpha0=0.7, tau0=2.5)


def test_default_clamp_range_lives_in_params():
    from tune_dynsdpb import losses, params
    assert losses.TAU_RANGE == params.PARAMS["tau_range"].default == (0.05, 20.0)
