"""Flow times for training (a sampler) and for inference (a schedule), in the t = 0 noise, t = 1 data convention.

Training, logit-normal (Movie Gen §3.1.2, as in SD3):

    n ~ N(m, s²),   t = sigmoid(n) = 1 / (1 + e^(−n))            (m = 0, s = 1 in the paper)

optionally shifted toward noise (Open-Sora 2.0 style, off by default; α = 1 is the identity), in σ = 1 − t:

    σ' = α·σ / (1 + (α − 1)·σ),   t' = 1 − σ'

Inference, the linear-quadratic schedule (Movie Gen §3.4; closed form as in Mochi / LTX-Video) with S steps
emulating an N-step linear schedule: the first L = S // 2 steps are those of the N-step linear schedule, the
remaining Q = S − L steps are quadratically spaced up to t = 1. With τ = L / N:

    f(i) = i·τ / L                                  0 ≤ i < L
    f(i) = a·i² + b·i + c                           L ≤ i ≤ S
    d = L − τ·S,  a = d / (L·Q²),  b = τ/L − 2·d/Q²,  c = a·L²

so f(0) = 0 (noise), f(L) = τ, f(S) = 1 (data), and the slope is continuous at L (f'(L) = τ / L = 1 / N).
"""

from __future__ import annotations

import torch


def logit_normal(batch_size: int, mean: float = 0.0, std: float = 1.0, *, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """t = sigmoid(n), n ~ N(mean, std²): [batch_size] times in (0, 1)."""
    n = torch.randn(batch_size, generator=generator, device=device)
    return torch.sigmoid(mean + std * n)


def shift_time(t: torch.Tensor, alpha: float) -> torch.Tensor:
    """t' = 1 − σ' with σ = 1 − t and σ' = α·σ / (1 + (α − 1)·σ); α > 1 moves times toward noise."""
    if alpha <= 0:
        raise ValueError(f"time shift alpha must be > 0, got {alpha}")
    sigma = 1.0 - t
    return 1.0 - alpha * sigma / (1.0 + (alpha - 1.0) * sigma)


def uniform_schedule(num_steps: int) -> torch.Tensor:
    """t_i = i / S, i = 0..S: [S + 1] times from 0 (noise) to 1 (data)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64).float()


def linear_quadratic_schedule(num_steps: int = 50, emulated_steps: int = 1000) -> torch.Tensor:
    """The linear-quadratic schedule f(0..S) (see the module docstring): [S + 1] times from 0 to 1."""
    if num_steps < 2:
        return uniform_schedule(num_steps)
    linear, quadratic = num_steps // 2, num_steps - num_steps // 2
    tau = linear / emulated_steps
    if not 0.0 < tau < 1.0:
        raise ValueError(f"linear_quadratic_schedule: emulated_steps={emulated_steps} must exceed num_steps // 2 = {linear}")
    d = linear - tau * num_steps
    a = d / (linear * quadratic**2)
    b = tau / linear - 2.0 * d / quadratic**2
    c = a * linear**2
    i = torch.arange(num_steps + 1, dtype=torch.float64)
    t = torch.where(i < linear, i * tau / linear, a * i**2 + b * i + c)
    t[-1] = 1.0  # exact endpoint
    return t.float()


def schedule(name: str, num_steps: int, emulated_steps: int = 1000) -> torch.Tensor:
    """A schedule by name: "linear_quadratic" or "uniform"."""
    if name == "linear_quadratic":
        return linear_quadratic_schedule(num_steps, emulated_steps)
    if name == "uniform":
        return uniform_schedule(num_steps)
    raise ValueError(f"unknown schedule {name!r}; choose linear_quadratic or uniform")
