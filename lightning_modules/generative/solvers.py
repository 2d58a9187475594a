"""ODE solvers for flow models: integrate dX/dt = u(X, t) from noise at t_0 to data at t_S.

`model_fn(x, t)` takes x [B, ...] and t [B] and returns the velocity [B, ...]; `timesteps` is [S + 1] increasing
times (e.g. from `generative.timesteps`). Sampling a model is `euler(model_fn, noise, timesteps)`.

    Euler (Movie Gen §3.4):  X_{i+1} = X_i + (t_{i+1} − t_i)·u(X_i, t_i)
    midpoint:                X_{i+1} = X_i + h·u(X_i + (h/2)·u(X_i, t_i), t_i + h/2),   h = t_{i+1} − t_i
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


def _times(timesteps: torch.Tensor) -> list[float]:
    if timesteps.ndim != 1 or timesteps.numel() < 2:
        raise ValueError(f"timesteps must be a 1-D tensor of S + 1 >= 2 times, got {list(timesteps.shape)}")
    return [float(t) for t in timesteps]


@torch.no_grad()
def euler(model_fn: ModelFn, noise: torch.Tensor, timesteps: torch.Tensor,
          callback: StepCallback | None = None) -> torch.Tensor:
    """First-order Euler: X_{i+1} = X_i + (t_{i+1} − t_i)·u(X_i, t_i), from X_0 = noise; returns X_S."""
    times = _times(timesteps)
    x = noise
    for i, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
        u = model_fn(x, torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype))
        x = x + (t_next - t) * u
        if callback is not None:
            callback(i, x, u)
    return x


@torch.no_grad()
def midpoint(model_fn: ModelFn, noise: torch.Tensor, timesteps: torch.Tensor,
             callback: StepCallback | None = None) -> torch.Tensor:
    """Second-order midpoint (two model calls per step); see the module docstring."""
    times = _times(timesteps)
    x = noise
    full = lambda value: torch.full((x.shape[0],), value, device=x.device, dtype=x.dtype)
    for i, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
        h = t_next - t
        half = x + 0.5 * h * model_fn(x, full(t))
        u = model_fn(half, full(t + 0.5 * h))
        x = x + h * u
        if callback is not None:
            callback(i, x, u)
    return x


SOLVERS: dict[str, Callable[..., torch.Tensor]] = {"euler": euler, "midpoint": midpoint}


def solver(name: str) -> Callable[..., torch.Tensor]:
    """A solver by name ("euler" or "midpoint")."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {sorted(SOLVERS)}")
    return SOLVERS[name]
