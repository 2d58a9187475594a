"""The excess-risk decomposition (R_dir, R_mag, R_noise) against losses measured after real steps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from lightning_modules.privacy.clipping import dpsgd_factors
from lightning_modules.privacy.decomposition import (
    HessianOperator,
    direction_error,
    excess_risk_terms,
    flatten,
    gradient,
    mean_loss_fn,
    unflatten,
)


def _problem(seed: int = 0):
    """A small tanh net in float64; a batch where the minority group (label 2) has large gradients."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(200, 5, dtype=torch.float64)
    y = torch.randint(0, 2, (200,))
    y[:12] = 2  # the minority
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    batch = torch.arange(0, 200, 5)  # 40 examples, 3 of the minority
    per_example = vmap(grad(lambda p, xi, yi: F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])),
                       in_dims=(None, 0, 0))(params, x[batch], y[batch])
    grads = torch.cat([g.reshape(len(batch), -1) for g in per_example.values()], dim=1)
    return model, params, x, y, grads


def _loss_at(model, params, step: torch.Tensor, x, y) -> float:
    moved = {k: p - d for (k, p), d in zip(params.items(), unflatten(step, params).values())}
    return float(F.cross_entropy(functional_call(model, moved, (x,)), y))


@pytest.mark.parametrize("quantile", [0.0, 0.5, 0.9])
def test_clipping_terms_predict_the_loss_change_of_one_clipped_step(quantile):
    """C0 at a quantile of the per-example norms (0: every example clipped)."""
    model, params, x, y, grads = _problem()
    norms = grads.norm(dim=1)
    c0 = float(norms.quantile(quantile)) * (0.5 if quantile == 0 else 1.0)
    f = dpsgd_factors(norms, c0)
    assert (f < 1).float().mean() == pytest.approx(1 - quantile, abs=0.05)
    n = len(grads)
    g_b, gbar_b = grads.sum(0) / n, (f[:, None] * grads).sum(0) / n
    lr = 0.5 / g_b.norm().item() * 0.2  # a step of length 0.1
    for k in (0, 2):
        xk, yk = x[y == k], y[y == k]
        loss_k = mean_loss_fn(model, xk, yk)
        terms = excess_risk_terms(gradient(loss_k, params), g_b, gbar_b, HessianOperator(loss_k, params), lr, 0.0)
        measured = _loss_at(model, params, lr * gbar_b, xk, yk) - _loss_at(model, params, lr * g_b, xk, yk)
        # second order in eta: the remainder is O(eta^3 ||g||^3)
        assert terms["R_clip"] == pytest.approx(measured, rel=0.03, abs=1e-6)
        assert terms["R_dir"] + terms["R_mag"] == pytest.approx(terms["R_clip"])
        assert terms["R_noise"] == 0.0 and terms["rho"] == pytest.approx(float(gbar_b.norm() / g_b.norm()))


def test_rescaled_update_has_no_direction_error():
    """gbar_B = c g_B (Global-Adapt with nothing above Z): R_dir = 0 and DE = 0; only magnitude error remains."""
    model, params, x, y, grads = _problem()
    g_b = grads.mean(0)
    loss_k = mean_loss_fn(model, x[y == 2], y[y == 2])
    terms = excess_risk_terms(gradient(loss_k, params), g_b, 0.3 * g_b, HessianOperator(loss_k, params), 0.1, 0.0)
    assert abs(terms["R_dir"]) < 1e-12 and abs(terms["R_mag"]) > 1e-3 and terms["R_clip"] == pytest.approx(terms["R_mag"])
    assert direction_error(gradient(loss_k, params), g_b, 0.3 * g_b) == pytest.approx(0.0, abs=1e-12)


def test_hutchinson_trace_and_hvp_match_the_exact_hessian():
    model, params, x, y, _ = _problem()
    loss_k = mean_loss_fn(model, x[y == 2], y[y == 2])
    flat = flatten(params)
    exact = torch.autograd.functional.hessian(lambda v: loss_k(unflatten(v, params)), flat)
    op = HessianOperator(loss_k, params)
    v = torch.randn_like(flat)
    assert torch.allclose(op(v), exact @ v, atol=1e-10)
    estimate = op.trace(2000, torch.Generator().manual_seed(0))
    assert estimate == pytest.approx(float(exact.trace()), rel=0.05)


def test_noise_term_predicts_the_mean_loss_change_from_gaussian_noise():
    model, params, x, y, grads = _problem()
    xk, yk = x[y == 2], y[y == 2]
    loss_k = mean_loss_fn(model, xk, yk)
    op = HessianOperator(loss_k, params)
    lr, s = 0.1, 0.05
    terms = excess_risk_terms(gradient(loss_k, params), grads.mean(0), grads.mean(0), op, lr, s,
                              trace=float(torch.autograd.functional.hessian(lambda v: loss_k(unflatten(v, params)),
                                                                            flatten(params)).trace()))
    gen = torch.Generator().manual_seed(1)
    base = _loss_at(model, params, torch.zeros(len(flatten(params)), dtype=torch.float64), xk, yk)
    diffs = []
    for _ in range(3000):  # antithetic pairs cancel the first-order term
        xi = torch.randn(len(flatten(params)), generator=gen, dtype=torch.float64) * s * lr
        diffs.append((_loss_at(model, params, xi, xk, yk) + _loss_at(model, params, -xi, xk, yk)) / 2 - base)
    assert terms["R_noise"] == pytest.approx(sum(diffs) / len(diffs), rel=0.1)


def test_terms_are_exact_on_a_quadratic_loss():
    """L(w) = w'Aw/2 + b'w: second order is exact, so each term equals the loss difference it names
    (R_dir = L(w - eta gbar) - L(w - eta rho g), R_mag = L(w - eta rho g) - L(w - eta g)) and R_noise =
    E L(w - eta (gbar + xi)) - L(w - eta gbar) = eta^2/2 s^2 Tr(A), in float64."""
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    a, b = m @ m.T + torch.eye(6, dtype=torch.float64), torch.randn(6, generator=gen, dtype=torch.float64)
    w = {"w": torch.randn(6, generator=gen, dtype=torch.float64)}

    def loss(params):
        return params["w"] @ a @ params["w"] / 2 + b @ params["w"]

    def at(v):
        return float(loss({"w": w["w"] - v}))

    g, lr, s = torch.randn(6, generator=gen, dtype=torch.float64), 0.3, 0.2
    gbar = 0.4 * g + 0.2 * torch.randn(6, generator=gen, dtype=torch.float64)  # a turned and shortened update
    rho = float(gbar.norm() / g.norm())
    terms = excess_risk_terms(gradient(loss, w), g, gbar, HessianOperator(loss, w), lr, s, trace=float(a.trace()))
    assert terms["R_dir"] == pytest.approx(at(lr * gbar) - at(lr * rho * g), rel=1e-10)
    assert terms["R_mag"] == pytest.approx(at(lr * rho * g) - at(lr * g), rel=1e-10)
    assert terms["R_noise"] == pytest.approx(lr**2 / 2 * s**2 * float(a.trace()), rel=1e-12)
    # one Hutchinson probe is allowed: v'Av for the Rademacher v its generator draws
    v = torch.randint(0, 2, (6,), generator=torch.Generator().manual_seed(1)).to(torch.float64) * 2 - 1
    assert HessianOperator(loss, w).trace(1, torch.Generator().manual_seed(1)) == pytest.approx(float(v @ a @ v))
