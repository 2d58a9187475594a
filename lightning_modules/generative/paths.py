"""The flow-matching probability path of Movie Gen (arXiv 2410.13720 §3.1.2), exactly as the paper states it.

Convention: t = 0 is pure noise, t = 1 is data. X_1 is a data latent, X_0 ~ N(0, I), σ_min = 1e-5:

    X_t = t·X_1 + (1 − (1 − σ_min)·t)·X_0                (the path)
    V_t = dX_t/dt = X_1 − (1 − σ_min)·X_0                (the regression target)
    L   = E_{t, X_0, X_1, P} ‖u(X_t, P, t; θ) − V_t‖²    (mean over elements)

Many codebases (SD3, diffusers, Mochi) use σ = 1 − t with σ = 1 = noise; this file does not.
"""

from __future__ import annotations

import torch

SIGMA_MIN = 1e-5


def expand_time(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t [B] (or a scalar) → [B, 1, ..., 1] broadcastable to `like` [B, ...]."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.ndim == 0:
        t = t.expand(like.shape[0])
    if t.shape != (like.shape[0],):
        raise ValueError(f"t must be a scalar or [B] = [{like.shape[0]}], got {list(t.shape)}")
    return t.view(-1, *([1] * (like.ndim - 1)))


def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, sigma_min: float = SIGMA_MIN) -> torch.Tensor:
    """X_t = t·X_1 + (1 − (1 − σ_min)·t)·X_0 for noise x0, data x1 [B, ...] and t [B]."""
    t = expand_time(t, x1)
    return t * x1 + (1.0 - (1.0 - sigma_min) * t) * x0


def target_velocity(x0: torch.Tensor, x1: torch.Tensor, sigma_min: float = SIGMA_MIN) -> torch.Tensor:
    """V_t = X_1 − (1 − σ_min)·X_0 (independent of t: the paths are straight lines)."""
    return x1 - (1.0 - sigma_min) * x0


def sample_path(x1: torch.Tensor, t: torch.Tensor, sigma_min: float = SIGMA_MIN,
                noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(X_0, X_t, V_t) for data x1 at times t; X_0 ~ N(0, I) unless `noise` is given."""
    x0 = torch.randn_like(x1) if noise is None else noise
    return x0, interpolate(x0, x1, t, sigma_min), target_velocity(x0, x1, sigma_min)


def flow_matching_loss(prediction: torch.Tensor, target: torch.Tensor, per_sample: bool = False) -> torch.Tensor:
    """‖u − V_t‖² averaged over elements (per sample [B] when `per_sample`, else a scalar)."""
    error = (prediction.float() - target.float()).pow(2)
    return error.flatten(1).mean(1) if per_sample else error.mean()


def predicted_data(x_t: torch.Tensor, velocity: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """X̂_1 = X_t + (1 − t)·u: one Euler step to t = 1 (equals X_1 + σ_min·X_0 when u = V_t)."""
    return x_t + (1.0 - expand_time(t, x_t)) * velocity
