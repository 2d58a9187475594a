"""The four methods' per-sample clipping rules, as pure functions of per-sample gradient norms.

Notation: g_i is the gradient of example i's loss, ||g_i|| its L2 norm over all parameters, C0 the clip
bound, a_i the group of example i. Every rule returns factors f_i; the clipped gradient is f_i * g_i and
the released sum is  sum_i f_i g_i + N(0, sigma^2 S^2 I)  with S the bound on ||f_i g_i|| (the sensitivity).

| method                 | f_i                                            | S      |
|------------------------|------------------------------------------------|--------|
| DP-SGD                 | min(1, C0 / ||g_i||)                           | C0     |
| DPSGD-F                | min(1, C_{a_i} / ||g_i||), C_k from noisy counts | max_k C_k |
| DPSGD-Global           | C0 / Z if ||g_i|| <= Z else 0                  | C0     |
| DPSGD-Global-Adapt     | C0 / max(||g_i||, Z)                           | C0     |

Global-Adapt moves Z after every step: Z <- Z * exp(-eta_Z + b~), b~ = (#{i: ||g_i|| > gamma Z} + N(0, sigma2^2)) / n.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

_TINY = 1e-12  # guards 0/0 for exactly-zero gradients; f_i * 0 = 0 either way


def per_sample_norms(grad_samples: Sequence[Tensor]) -> Tensor:
    """||g_i|| = sqrt(sum_p ||g_{i,p}||^2) over the parameter tensors p; each entry is [B, *p.shape] -> [B]."""
    if not grad_samples:
        raise ValueError("no per-sample gradients: is any parameter trainable?")
    per_tensor = [torch.linalg.vector_norm(g.reshape(len(g), -1), dim=1) for g in grad_samples]
    return torch.linalg.vector_norm(torch.stack(per_tensor, dim=1), dim=1)


def dpsgd_factors(norms: Tensor, max_grad_norm: float) -> Tensor:
    """DP-SGD (Abadi et al.): f_i = min(1, C0 / ||g_i||), so ||f_i g_i|| = min(||g_i||, C0)."""
    return (max_grad_norm / norms.clamp(min=_TINY)).clamp(max=1.0)


def global_factors(norms: Tensor, max_grad_norm: float, z: float) -> Tensor:
    """DPSGD-Global (Bu et al.): f_i = C0 / Z if ||g_i|| <= Z else 0 (large gradients are dropped), Z >= C0."""
    return torch.where(norms <= z, torch.full_like(norms, max_grad_norm / z), torch.zeros_like(norms))


def global_adapt_factors(norms: Tensor, max_grad_norm: float, z: float) -> Tensor:
    """DPSGD-Global-Adapt: f_i = C0 / max(||g_i||, Z).

    ||g_i|| <= Z: every such gradient is scaled by the same C0 / Z (direction kept); ||g_i|| > Z: clipped to
    norm C0. Hence ||f_i g_i|| <= C0 always.
    """
    return max_grad_norm / norms.clamp(min=z)


def group_clip_counts(norms: Tensor, groups: Tensor, max_grad_norm: float, num_groups: int) -> tuple[Tensor, Tensor]:
    """DPSGD-F's counts per group k: m_k = #{i in k: ||g_i|| > C0}, o_k = #{i in k: ||g_i|| <= C0}."""
    if len(groups) and (groups.min() < 0 or groups.max() >= num_groups):
        raise ValueError(f"group labels must be in [0, {num_groups}); got {groups.min().item()}..{groups.max().item()} "
                         "(set dp.num_groups)")
    over = (norms > max_grad_norm).to(torch.float64)
    m = torch.zeros(num_groups, dtype=torch.float64, device=norms.device).index_add_(0, groups, over)
    o = torch.zeros(num_groups, dtype=torch.float64, device=norms.device).index_add_(0, groups, 1.0 - over)
    return m, o


DPSGD_F_RULES = ("paper", "noisy_total", "mean_ratio")


def dpsgd_f_bounds(
    clipped: Tensor, unclipped: Tensor, max_grad_norm: float, batch_size: float | None = None, rule: str = "paper"
) -> Tensor:
    """DPSGD-F (Xu et al., paper Alg. 4) per-group bounds from the noisy counts m~_k (clipped), o~_k (unclipped).

    b~_k = m~_k + o~_k,  r_k = m~_k / b~_k (r_k = 1 for a group with b~_k = 0),  m~ = sum_k m~_k:

    - "paper" (the default, Alg. 4):      C_k = C0 * (1 + r_k / (m~ / |B|)),  |B| = `batch_size`, the actual
      batch size;
    - "noisy_total" (this project's earlier variant): C_k = C0 * (1 + r_k / (m~ / b~)), b~ = sum_k b~_k, so
      |B| itself is never used; an empty group gets r_k = 0 (bound C0);
    - "mean_ratio" (the authors' code): C_k = C0 * (1 + r_k / (mean_k r_k + 1e-8)).

    With no (noisy) clipped example at all (m~ = 0) or an empty batch, every bound is C0 ("paper",
    "noisy_total"): nothing is clipped by the counts' account, and the ratio would divide by zero.
    """
    if rule not in DPSGD_F_RULES:
        raise ValueError(f"dp.dpsgd_f_rule={rule!r}; choose one of {DPSGD_F_RULES}")
    batch = clipped + unclipped
    total_clipped, total = clipped.sum(), batch.sum()
    empty_ratio = 0.0 if rule == "noisy_total" else 1.0
    ratio = torch.where(batch > 0, clipped / batch.clamp(min=1e-12), torch.full_like(batch, empty_ratio))
    if rule == "mean_ratio":
        return max_grad_norm * (1.0 + ratio / (ratio.mean() + 1e-8))
    if rule == "paper":
        if batch_size is None:
            raise ValueError("the paper's DPSGD-F rule needs the actual batch size |B|")
        total = torch.as_tensor(float(batch_size), dtype=clipped.dtype)
    if total_clipped <= 0 or total <= 0:
        return torch.full_like(clipped, max_grad_norm)
    return max_grad_norm * (1.0 + ratio / (total_clipped / total))


def dpsgd_f_factors(norms: Tensor, groups: Tensor, bounds: Tensor) -> Tensor:
    """DPSGD-F: f_i = min(1, C_{a_i} / ||g_i||)."""
    return (bounds.to(norms.dtype)[groups] / norms.clamp(min=_TINY)).clamp(max=1.0)


def noisy_counts(counts: Tensor, noise_multiplier: float, generator: torch.Generator | None = None) -> Tensor:
    """DPSGD-F's count release: max(floor(c + N(0, sigma_c^2)), 0) per entry (sensitivity 1 in L2)."""
    noise = torch.normal(0.0, noise_multiplier, size=counts.shape, generator=generator, dtype=counts.dtype)
    return (counts + noise.to(counts.device)).floor().clamp(min=0)


def next_z(z: float, noisy_fraction: float, z_lr: float, z_min: float | None = None, z_max: float | None = None) -> float:
    """Global-Adapt's geometric update Z <- Z * exp(-eta_Z + b~), clamped to [z_min, z_max] where given.

    The optimizer passes z_min = C0 unless the config sets another floor (the paper requires Z >= C0: below
    C0, f_i = C0 / max(||g_i||, Z) > 1 would scale small gradients UP).

    b~ is the noisy fraction of the batch with ||g_i|| > gamma Z; in expectation log Z moves by
    frac - eta_Z, so Z settles where a fraction eta_Z of per-sample norms exceeds gamma Z.
    """
    z = z * math.exp(-z_lr + noisy_fraction)
    if z_min is not None:
        z = max(z, z_min)
    if z_max is not None:
        z = min(z, z_max)
    return z
