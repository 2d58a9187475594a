"""Samplers: integrate the probability-flow ODE dX/dt = u(X, t) from noise at t_0 to data at t_S.

`model_fn(x, t)` takes x [B, ...] and t [B] (in x's dtype) and returns the model output [B, ...]; `timesteps` is
[S + 1] increasing times (e.g. from `generative.timesteps`). `euler` and `midpoint` take a velocity model;
`solve` takes any prediction type and converts it through the path (`paths.AffinePath.convert`).

    Euler (Movie Gen §3.4):  X_{i+1} = X_i + (t_{i+1} − t_i)·u(X_i, t_i)
    midpoint:                X_{i+1} = X_i + h·u(X_i + (h/2)·u(X_i, t_i), t_i + h/2),   h = t_{i+1} − t_i
    DDIM, η = 0 (Song et al. 2021, eq. 12, in our notation):
                             (X̂_1, X̂_0) = to_data_noise(model(X_i, t_i)),
                             X_{i+1} = α(t_{i+1})·X̂_1 + σ(t_{i+1})·X̂_0

DDIM keeps the predicted noise and re-noises the predicted data to the next level; it ends on X̂_1 when the last
time has σ = 0 (t = 1 on VPPath and on FlowMatchingPath with σ_min = 0). When α_t and σ_t are affine in t (the flow-
matching path) DDIM and Euler coincide: α_{i+1}X̂_1 + σ_{i+1}X̂_0 = X_i + h·(α'X̂_1 + σ'X̂_0).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lightning_modules.generative.paths import AffinePath, check_prediction

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


@torch.no_grad()
def ddim(model_fn: ModelFn, noise: torch.Tensor, timesteps: torch.Tensor, path: AffinePath, prediction: str,
         callback: StepCallback | None = None) -> torch.Tensor:
    """Deterministic DDIM (η = 0): X_{i+1} = α(t_{i+1})·X̂_1 + σ(t_{i+1})·X̂_0 with (X̂_1, X̂_0) the model's data and
    noise estimates at (X_i, t_i); from X_0 = noise, returns X_S. `callback(i, X_{i+1}, X̂_1)` gets the data estimate.
    Path coefficients are taken at the float64 times so VP knots are hit exactly; the model sees t in x's dtype."""
    times = _times(timesteps)
    check_prediction(prediction)
    x = noise
    for i, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
        out = model_fn(x, torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype))
        x1_hat, x0_hat = path.to_data_noise(out, x, t, prediction)
        alpha, sigma, _, _ = path.expanded(t_next, x)
        x = alpha * x1_hat + sigma * x0_hat
        if callback is not None:
            callback(i, x, x1_hat)
    return x


SOLVERS: dict[str, Callable[..., torch.Tensor]] = {"euler": euler, "midpoint": midpoint}  # velocity solvers
SOLVER_NAMES = ("euler", "midpoint", "ddim")


def solver(name: str) -> Callable[..., torch.Tensor]:
    """A velocity solver by name ("euler" or "midpoint"), called as f(model_fn, noise, timesteps, callback=None);
    for DDIM or other predictions use `solve`."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {sorted(SOLVERS)} (ddim: use solve())")
    return SOLVERS[name]


def as_velocity(model_fn: ModelFn, path: AffinePath, prediction: str) -> ModelFn:
    """model_fn predicting `prediction` → a velocity model u(x, t) = path.convert(model_fn(x, t), x, t, prediction,
    "velocity")."""
    check_prediction(prediction)
    if prediction == "velocity":
        return model_fn

    def velocity_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return path.convert(model_fn(x, t), x, t, prediction, "velocity")

    return velocity_fn


def solve(name: str, model_fn: ModelFn, noise: torch.Tensor, timesteps: torch.Tensor, path: AffinePath | None = None,
          prediction: str = "velocity", callback: StepCallback | None = None) -> torch.Tensor:
    """Sample with solver `name` ("euler", "midpoint" or "ddim") and a model predicting `prediction`.

    euler / midpoint integrate u = convert(output → "velocity") (no path needed for a velocity model);
    ddim converts the output to (X̂_1, X̂_0) and needs the path. The callback gets (i, X_{i+1}, u) for euler/midpoint
    and (i, X_{i+1}, X̂_1) for ddim."""
    if name not in SOLVER_NAMES:
        raise ValueError(f"unknown solver {name!r}; choose one of {', '.join(SOLVER_NAMES)}")
    check_prediction(prediction)
    if path is None and (name == "ddim" or prediction != "velocity"):
        raise ValueError(f"solver {name!r} with prediction {prediction!r} needs a path")
    if name == "ddim":
        return ddim(model_fn, noise, timesteps, path, prediction, callback)  # type: ignore[arg-type]
    velocity_fn = model_fn if path is None else as_velocity(model_fn, path, prediction)
    return SOLVERS[name](velocity_fn, noise, timesteps, callback)
