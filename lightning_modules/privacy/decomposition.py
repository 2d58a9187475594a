"""The paper's fine-grained unfairness measurements (Esipova et al. 2023, Sec. 3; reference notes Sec. 4.3-4.4).

For one training step at parameters theta with learning rate eta (plain SGD), batch B, per-example gradients g_i and
the method's clip factors f_i:

    g_B    = sum_{i in B} g_i / n          gbar_B = sum_{i in B} f_i g_i / n      (n: the update's denominator)
    rho    = ||gbar_B|| / ||g_B||          noise on the update: xi ~ N(0, s^2 I), s = sigma S / n

and for a group k with full-data (or large held-out) gradient g_Dk and Hessian H_k of its mean loss L_k:

    R_dir_inner = eta <g_Dk, rho g_B - gbar_B>         R_dir_hess = eta^2/2 (gbar_B' H_k gbar_B - rho^2 g_B' H_k g_B)
    R_mag_inner = eta <g_Dk, (1 - rho) g_B>            R_mag_hess = eta^2/2 (rho^2 - 1) g_B' H_k g_B
    R_noise     = eta^2/2 s^2 Tr(H_k)                  (Tr(H_k) by Hutchinson: E[v' H v], v Rademacher)

R_dir + R_mag = eta <g_Dk, g_B - gbar_B> + eta^2/2 (gbar_B' H gbar_B - g_B' H g_B) is the second-order prediction
of L_k(theta - eta gbar_B) - L_k(theta - eta g_B): the extra loss of group k from clipping in this step, and
R_noise that of E[L_k(theta - eta (gbar_B + xi))] - L_k(theta - eta gbar_B). (The paper writes R_noise with
C0^2 sigma^2 for noise on the mean; here s is the std of the noise the optimizer actually adds to the mean,
sigma S / n.) Direction error of group k (Prop. 3): DE_k = cos(g_Dk, g_B) - cos(g_Dk, gbar_B).

Hessian-vector products by double backprop through `torch.func.functional_call`, so the module's own
parameters (and any per-sample gradient hooks, which the caller disables) are untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

_EPS = 1e-12
LossFn = Callable[[Mapping[str, Tensor]], Tensor]


def flatten(tensors: Mapping[str, Tensor] | list[Tensor]) -> Tensor:
    values = tensors.values() if isinstance(tensors, Mapping) else tensors
    return torch.cat([t.reshape(-1) for t in values])


def unflatten(vector: Tensor, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out, start = {}, 0
    for name, p in like.items():
        out[name] = vector[start : start + p.numel()].view_as(p)
        start += p.numel()
    return out


def cosine(a: Tensor, b: Tensor) -> float:
    """cos(a, b) of two flat vectors (0 when either is 0)."""
    return float((a @ b) / (a.norm() * b.norm()).clamp(min=_EPS))


def mean_loss_fn(module: nn.Module, x: Tensor, y: Tensor) -> LossFn:
    """params -> mean cross-entropy of `module` with those parameters on (x, y)."""

    def loss(params: Mapping[str, Tensor]) -> Tensor:
        return F.cross_entropy(functional_call(module, dict(params), (x,)), y)

    return loss


def gradient(loss_fn: LossFn, params: Mapping[str, Tensor]) -> Tensor:
    """The flat gradient of loss_fn at params."""
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    return flatten(torch.autograd.grad(loss_fn(leaves), list(leaves.values())))


class HessianOperator:
    """v -> H v for the Hessian H of loss_fn at params (double backprop; the first backward is kept)."""

    def __init__(self, loss_fn: LossFn, params: Mapping[str, Tensor]) -> None:
        self.leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        self.grad = flatten(torch.autograd.grad(loss_fn(self.leaves), list(self.leaves.values()), create_graph=True))

    def __call__(self, v: Tensor) -> Tensor:
        hv = torch.autograd.grad(self.grad @ v.detach(), list(self.leaves.values()), retain_graph=True)
        return flatten(hv).detach()

    def quadratic(self, v: Tensor) -> float:
        """v' H v."""
        return float(v.detach() @ self(v))

    def trace(self, probes: int, generator: torch.Generator | None = None) -> float:
        """Hutchinson: Tr(H) ~ mean over Rademacher v of v' H v."""
        if probes < 1:
            raise ValueError(f"Hutchinson needs at least one probe, got {probes}")
        total = 0.0
        for _ in range(probes):
            v = torch.randint(0, 2, self.grad.shape, generator=generator).to(self.grad) * 2 - 1
            total += self.quadratic(v)
        return total / probes


def excess_risk_terms(
    g_group: Tensor,
    g_batch: Tensor,
    g_batch_clipped: Tensor,
    hessian: HessianOperator,
    lr: float,
    noise_std: float,
    trace: float | None = None,
) -> dict[str, float]:
    """R_dir_inner, R_dir_hess, R_mag_inner, R_mag_hess, R_noise (module docstring) and their sums for one group.

    g_group: g_Dk; g_batch, g_batch_clipped: g_B, gbar_B (flat, same denominator); noise_std: s, the std per
    coordinate of the noise on the update direction; trace: Tr(H_k) (needed when noise_std > 0).
    """
    rho = float(g_batch_clipped.norm() / g_batch.norm().clamp(min=_EPS))
    g_h_g = hessian.quadratic(g_batch)
    gbar_h_gbar = hessian.quadratic(g_batch_clipped)
    terms = {
        "R_dir_inner": lr * float(g_group @ (rho * g_batch - g_batch_clipped)),
        "R_dir_hess": lr**2 / 2 * (gbar_h_gbar - rho**2 * g_h_g),
        "R_mag_inner": lr * (1 - rho) * float(g_group @ g_batch),
        "R_mag_hess": lr**2 / 2 * (rho**2 - 1) * g_h_g,
        "R_noise": 0.0 if noise_std == 0 else lr**2 / 2 * noise_std**2 * _required(trace),
    }
    terms["R_dir"] = terms["R_dir_inner"] + terms["R_dir_hess"]
    terms["R_mag"] = terms["R_mag_inner"] + terms["R_mag_hess"]
    terms["R_clip"] = terms["R_dir"] + terms["R_mag"]
    terms["rho"] = rho
    return terms


def _required(trace: float | None) -> float:
    if trace is None:
        raise ValueError("R_noise needs Tr(H_k) (HessianOperator.trace) when the noise std is positive")
    return trace


def direction_error(g_group: Tensor, g_batch: Tensor, g_batch_clipped: Tensor) -> float:
    """Prop. 3's direction error of a group: cos(g_Dk, g_B) - cos(g_Dk, gbar_B) (> 0: clipping turns away from k)."""
    return cosine(g_group, g_batch) - cosine(g_group, g_batch_clipped)
