"""Affine probability paths, their regression targets and exact conversions between prediction types.

Convention everywhere: t = 0 is pure noise, t = 1 is data. X_1 is a data latent, X_0 ~ N(0, I) the noise, and a path
is an affine interpolation with scalar schedules α_t (signal) and σ_t (noise):

    X_t = α_t·X_1 + σ_t·X_0,        dX_t/dt = α'_t·X_1 + σ'_t·X_0

A network predicts one of four quantities, all linear in (X_1, X_0) given t, so any one converts exactly into any
other through the pair (data, noise) = (X̂_1, X̂_0):

    "velocity"  u = α'·X_1 + σ'·X_0                  (flow matching)
    "epsilon"   ε = X_0                              (the noise; DDPM's ε-prediction)
    "data"      X_1                                  (diffusion papers call this "x0-prediction": they name data x_0)
    "v"         v = α·X_0 − σ·X_1                    (Salimans & Ho 2022, arXiv 2202.00512 §4)

Inverses, given X_t and a prediction p (the 2×2 systems [α σ; ·] [X_1; X_0] = [X_t; p]):

    data:      X̂_1 = p,                            X̂_0 = (X_t − α·p) / σ            (needs σ > 0)
    epsilon:   X̂_0 = p,                            X̂_1 = (X_t − σ·p) / α            (needs α > 0)
    velocity:  X̂_1 = (σ'·X_t − σ·p) / D,           X̂_0 = (α·p − α'·X_t) / D,   D = α·σ' − σ·α'  (≠ 0 on our paths)
    v:         X̂_1 = (α·X_t − σ·p) / (α² + σ²),    X̂_0 = (σ·X_t + α·p) / (α² + σ²)

Paths here:

* `FlowMatchingPath` (Movie Gen, arXiv 2410.13720 §3.1.2): α_t = t, σ_t = 1 − (1 − σ_min)·t, so
  X_t = t·X_1 + (1 − (1 − σ_min)·t)·X_0 and the velocity target V_t = X_1 − (1 − σ_min)·X_0 (t-free: straight lines).
  Many codebases (SD3, diffusers, Mochi) use σ = 1 − t with σ = 1 = noise; this file does not.
* `VPPath`: discrete variance-preserving diffusion (DDPM/LDM betas, α_t² + σ_t² = 1) made continuous in t; see its
  docstring for the time mapping.

The module-level functions (`interpolate`, `target_velocity`, `sample_path`, `predicted_data`) are the flow-matching
path with σ_min as an argument, kept for the callers that predate the path classes.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch

SIGMA_MIN = 1e-5
PREDICTIONS = ("velocity", "epsilon", "data", "v")

Coefficients = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def correlate_frames(noise: torch.Tensor, shared: torch.Tensor, correlation: float) -> torch.Tensor:
    """PYoCo's mixed noise prior (arXiv 2305.10474 §3.2) for noise [B, C, T, H, W] and a shared draw [B, C, 1, H, W]:

        X_0[:, :, f] = (a·shared + noise[:, :, f]) / sqrt(1 + a²),     a = `correlation`

    Every frame stays N(0, I); two frames correlate by a² / (1 + a²) per element, so the frames of a clip start
    from one layout. a = 0 returns `noise` unchanged."""
    if correlation == 0:
        return noise
    if noise.ndim != 5 or shared.shape != (*noise.shape[:2], 1, *noise.shape[3:]):
        raise ValueError(f"correlate_frames needs noise [B, C, T, H, W] and shared [B, C, 1, H, W], got "
                         f"{list(noise.shape)} and {list(shared.shape)}")
    return (correlation * shared + noise) / math.sqrt(1.0 + correlation**2)


def progressive_frames(noise: torch.Tensor, correlation: float) -> torch.Tensor:
    """PYoCo's progressive noise prior (arXiv 2305.10474 §3.2) for noise [B, C, T, H, W], an AR(1) chain in time:

        X_0[:, :, 0] = noise[:, :, 0],    X_0[:, :, f] = (a·X_0[:, :, f − 1] + noise[:, :, f]) / sqrt(1 + a²)

    Every frame stays N(0, I); frames f and g correlate by (a / sqrt(1 + a²))^|f − g| per element, so neighbours
    start alike and distant frames are free to differ (the mixed prior ties all frames to one layout).
    a = 0 returns `noise` unchanged."""
    if correlation == 0:
        return noise
    if noise.ndim != 5:
        raise ValueError(f"progressive_frames needs noise [B, C, T, H, W], got {list(noise.shape)}")
    frames = [noise[:, :, 0]]
    for f in range(1, noise.shape[2]):
        frames.append((correlation * frames[-1] + noise[:, :, f]) / math.sqrt(1.0 + correlation**2))
    return torch.stack(frames, dim=2)


def expand_time(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """t [B] (or a scalar) → [B, 1, ..., 1] broadcastable to `like` [B, ...], in like's dtype and device."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.ndim == 0:
        t = t.expand(like.shape[0])
    if t.shape != (like.shape[0],):
        raise ValueError(f"t must be a scalar or [B] = [{like.shape[0]}], got {list(t.shape)}")
    return t.view(-1, *([1] * (like.ndim - 1)))


def as_time(t: torch.Tensor | float) -> torch.Tensor:
    """t as a floating tensor: a Python number becomes float64 (a VP knot time keeps its precision), an integer
    tensor the default dtype, a floating tensor is kept."""
    if isinstance(t, (int, float)):
        return torch.tensor(float(t), dtype=torch.float64)
    t = torch.as_tensor(t)
    return t if t.is_floating_point() else t.to(torch.get_default_dtype())


def check_prediction(prediction: str) -> str:
    """`prediction` if it is one of PREDICTIONS, else a one-line ValueError."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")
    return prediction


def flow_matching_loss(prediction: torch.Tensor, target: torch.Tensor, per_sample: bool = False) -> torch.Tensor:
    """‖prediction − target‖² averaged over elements (per sample [B] when `per_sample`, else a scalar), in float32."""
    error = (prediction.float() - target.float()).pow(2)
    return error.flatten(1).mean(1) if per_sample else error.mean()


class AffinePath(ABC):
    """X_t = α_t·X_1 + σ_t·X_0 (t = 0 noise, t = 1 data); subclasses give (α, σ, α', σ') in `coefficients`.

    Every method taking `t` accepts a scalar or a [B] tensor; methods that also take tensors [B, ...] broadcast t
    over the trailing dimensions (see `expand_time`).
    """

    name: str = "affine"

    @abstractmethod
    def coefficients(self, t: torch.Tensor | float) -> Coefficients:
        """(α_t, σ_t, dα_t/dt, dσ_t/dt), each shaped like t."""

    def alpha(self, t: torch.Tensor | float) -> torch.Tensor:
        """α_t, the data coefficient."""
        return self.coefficients(t)[0]

    def sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        """σ_t, the noise coefficient."""
        return self.coefficients(t)[1]

    def d_alpha(self, t: torch.Tensor | float) -> torch.Tensor:
        """dα_t/dt."""
        return self.coefficients(t)[2]

    def d_sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        """dσ_t/dt."""
        return self.coefficients(t)[3]

    def expanded(self, t: torch.Tensor | float, like: torch.Tensor) -> Coefficients:
        """(α, σ, α', σ') as [B, 1, ..., 1] tensors in like's dtype; t is a scalar or [B]."""
        t = as_time(t)
        if t.ndim == 0:
            t = t.expand(like.shape[0])
        if t.shape != (like.shape[0],):
            raise ValueError(f"t must be a scalar or [B] = [{like.shape[0]}], got {list(t.shape)}")
        view = (-1, *([1] * (like.ndim - 1)))
        return tuple(c.to(device=like.device, dtype=like.dtype).view(view)  # type: ignore[return-value]
                     for c in self.coefficients(t))

    def sample(self, x1: torch.Tensor, t: torch.Tensor | float,
               noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(X_0, X_t) with X_t = α_t·X_1 + σ_t·X_0; X_0 ~ N(0, I) unless `noise` is given."""
        x0 = torch.randn_like(x1) if noise is None else noise
        alpha, sigma, _, _ = self.expanded(t, x1)
        return x0, alpha * x1 + sigma * x0

    def target(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor | float, prediction: str) -> torch.Tensor:
        """The regression target of `prediction` for noise x0 and data x1 (the formulas in the module docstring)."""
        return self.from_data_noise(x1, x0, t, prediction)

    def loss(self, output: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor | float,
             prediction: str = "velocity", per_sample: bool = False) -> torch.Tensor:
        """‖output − target(x0, x1, t, prediction)‖² averaged over elements (`flow_matching_loss`)."""
        return flow_matching_loss(output, self.target(x0, x1, t, prediction), per_sample)

    def to_data_noise(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | float,
                      prediction: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(X̂_1, X̂_0) from a model output of type `prediction` at (X_t, t); the inverses in the module docstring."""
        alpha, sigma, d_alpha, d_sigma = self.expanded(t, x_t)
        check_prediction(prediction)
        if prediction == "data":
            return output, (x_t - alpha * output) / sigma
        if prediction == "epsilon":
            return (x_t - sigma * output) / alpha, output
        if prediction == "velocity":
            det = alpha * d_sigma - sigma * d_alpha
            return (d_sigma * x_t - sigma * output) / det, (alpha * output - d_alpha * x_t) / det
        norm = alpha * alpha + sigma * sigma  # "v"; = 1 on a VP path
        return (alpha * x_t - sigma * output) / norm, (sigma * x_t + alpha * output) / norm

    def from_data_noise(self, x1_hat: torch.Tensor, x0_hat: torch.Tensor, t: torch.Tensor | float,
                        prediction: str) -> torch.Tensor:
        """The `prediction` that corresponds to data X̂_1 and noise X̂_0 at time t (the definitions above)."""
        alpha, sigma, d_alpha, d_sigma = self.expanded(t, x1_hat)
        check_prediction(prediction)
        if prediction == "data":
            return x1_hat
        if prediction == "epsilon":
            return x0_hat
        if prediction == "velocity":
            return d_alpha * x1_hat + d_sigma * x0_hat
        return alpha * x0_hat - sigma * x1_hat  # "v"

    def convert(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | float, source: str,
                dest: str) -> torch.Tensor:
        """A `source` prediction at (X_t, t) as a `dest` prediction: from_data_noise(to_data_noise(...)), exact."""
        check_prediction(dest)
        check_prediction(source)
        if source == dest:
            return output
        x1_hat, x0_hat = self.to_data_noise(output, x_t, t, source)
        return self.from_data_noise(x1_hat, x0_hat, t, dest)


class FlowMatchingPath(AffinePath):
    """Movie Gen's path: α_t = t, σ_t = 1 − (1 − σ_min)·t, α' = 1, σ' = −(1 − σ_min).

    X_t = t·X_1 + (1 − (1 − σ_min)·t)·X_0 and V_t = X_1 − (1 − σ_min)·X_0. At t = 1, X_1 + σ_min·X_0 (σ_min keeps
    σ_1 > 0); σ_min = 0 is the rectified-flow / conditional-OT path (flow_matching's CondOTScheduler).
    """

    name = "flow_matching"

    def __init__(self, sigma_min: float = SIGMA_MIN) -> None:
        if not 0.0 <= sigma_min < 1.0:
            raise ValueError(f"sigma_min must be in [0, 1), got {sigma_min}")
        self.sigma_min = float(sigma_min)

    def coefficients(self, t: torch.Tensor | float) -> Coefficients:
        """(t, 1 − (1 − σ_min)·t, 1, −(1 − σ_min)), computed in t's dtype."""
        t = as_time(t)
        slope = 1.0 - self.sigma_min
        return t, 1.0 - slope * t, torch.ones_like(t), torch.full_like(t, -slope)

    def __repr__(self) -> str:
        return f"FlowMatchingPath(sigma_min={self.sigma_min})"


# -- variance-preserving diffusion -------------------------------------------------------------------------------
VP_SCHEDULES = ("linear", "scaled_linear", "cosine")


def vp_betas(schedule: str = "scaled_linear", num_train_steps: int = 1000, beta_start: float = 0.00085,
             beta_end: float = 0.012) -> torch.Tensor:
    """The DDPM betas β_k, k = 0..N−1 (k = N−1 noisiest), float64 [N]:

        linear          β_k = beta_start + (beta_end − beta_start)·k/(N − 1)             (Ho et al. 2020)
        scaled_linear   β_k = (√beta_start + (√beta_end − √beta_start)·k/(N − 1))²        (Stable Diffusion / LDM)
        cosine          β_k = min(1 − f((k+1)/N) / f(k/N), 0.999),  f(s) = cos²((s + 0.008)/1.008 · π/2)
                        (Nichol & Dhariwal 2021 eq. 17, their step t = k + 1; beta_start/end unused)
    """
    n = int(num_train_steps)
    if n < 2:
        raise ValueError(f"num_train_steps must be >= 2, got {num_train_steps}")
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
    if schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
    if schedule == "cosine":
        s = torch.arange(n + 1, dtype=torch.float64) / n
        f = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        # the ratio f((k+1)/N)/f(k/N) is ᾱ_k/ᾱ_{k-1}, so the normalisation by f(0) cancels; 0.999 keeps β_{N−1} < 1
        return (1.0 - f[1:] / f[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown VP schedule {schedule!r}; choose one of {', '.join(VP_SCHEDULES)}")


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024 (arXiv 2305.08891, Algorithm 1): with a_k = √ᾱ_k, the rescaled

        a'_k = (a_k − a_{N−1})·a_0 / (a_0 − a_{N−1}),   ᾱ'_k = a'_k²

    so ᾱ'_{N−1} = 0 exactly (zero SNR: the last step is pure noise) and ᾱ'_0 = ᾱ_0."""
    root = alphas_cumprod.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    return ((root - last) * (first / (first - last))) ** 2


def discrete_step_time(k: torch.Tensor | int, num_train_steps: int) -> torch.Tensor:
    """t = (N − 1 − k) / N: the time of discrete diffusion step k (k = N−1 → t = 0; k = 0 → t = 1 − 1/N), float64."""
    return (num_train_steps - 1 - torch.as_tensor(k, dtype=torch.float64)) / num_train_steps


class VPPath(AffinePath):
    """Discrete variance-preserving diffusion made continuous: α_t² + σ_t² = 1.

    Discrete: ᾱ_k = Π_{j≤k} (1 − β_j) for steps k = 0..N−1 (`vp_betas`; with `zero_terminal_snr`,
    `rescale_zero_terminal_snr`), x_k = √ᾱ_k·x_data + √(1 − ᾱ_k)·ε.

    Time mapping: N + 1 knots t_j = j/N, j = 0..N. Knot j < N is step k = N − 1 − j (`discrete_step_time`), so t = 0
    is the noisiest step N−1 and the DDIM spacings land on knots; the extra knot t_N = 1 is a virtual step
    "k = −1" with ᾱ = 1, i.e. t = 1 is EXACTLY clean data (α = 1, σ = 0). It is not step 0: ᾱ_0 = 1 − β_0 < 1
    (0.99915 for scaled_linear), which sits at t = 1 − 1/N. Solvers that end at t = 1 therefore end on the clean
    estimate (DDIM's final step returns X̂_1, as diffusers' `set_alpha_to_one=True`).
    Without zero_terminal_snr, t = 0 is NOT pure noise (ᾱ_{N−1} = 0.0047 for scaled_linear, N = 1000); samplers
    start there from pure noise anyway, the mismatch Lin et al. 2024 fix.

    Between knots the angle φ_t = atan2(σ_t, α_t) is linear in t (α = cos φ, σ = sin φ):

        φ_t = φ_j + w·Δ_j,  w = N·t − j,  Δ_j = φ_{j+1} − φ_j < 0
        α' = −σ·φ',  σ' = α·φ',  φ' = N·Δ_j       (left derivative at t = 1; t is clamped to [0, 1])

    Why the angle: α² + σ² = 1 exactly between knots, the derivatives stay finite at both ends (at t = 1 and at
    α = 0 with zero terminal SNR, where interpolating ᾱ would give infinite α'), and the velocity is simply φ'·v
    (v = α·ε − σ·x_data = −dX/dφ... up to sign: dX_t/dt = φ'·v). The velocity conversion needs D = α·σ' − σ·α' = φ'
    ≠ 0, true when every β_k > 0.

    Caveat: with zero_terminal_snr, α_0 = 0, so an "epsilon" model cannot give X̂_1 at t = 0 (division by α = 0);
    use "v" (as Lin et al. do) or "velocity".
    """

    name = "vp"

    def __init__(self, schedule: str = "scaled_linear", num_train_steps: int = 1000, beta_start: float = 0.00085,
                 beta_end: float = 0.012, zero_terminal_snr: bool = False) -> None:
        self.schedule = schedule
        self.num_train_steps = int(num_train_steps)
        self.beta_start, self.beta_end = float(beta_start), float(beta_end)
        self.zero_terminal_snr = bool(zero_terminal_snr)
        betas = vp_betas(schedule, self.num_train_steps, beta_start, beta_end)
        if not bool((betas > 0).all() and (betas < 1).all()):
            raise ValueError(f"VP betas must lie in (0, 1); check beta_start={beta_start}, beta_end={beta_end}")
        alphas_cumprod = torch.cumprod(1.0 - betas, 0)
        if self.zero_terminal_snr:
            alphas_cumprod = rescale_zero_terminal_snr(alphas_cumprod)
            betas = 1.0 - alphas_cumprod / torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        self.betas = betas  # [N] float64, indexed by step k
        self.alphas_cumprod = alphas_cumprod  # ᾱ_k, [N] float64
        # knots j = 0..N in time order: steps N−1..0, then the clean virtual step (ᾱ = 1)
        abar = torch.cat([alphas_cumprod.flip(0), alphas_cumprod.new_ones(1)])
        alpha = abar.clamp(0.0, 1.0).sqrt()
        sigma = (1.0 - abar).clamp(0.0, 1.0).sqrt()
        # the angle between consecutive knots from the rotation (α_j, σ_j) → (α_{j+1}, σ_{j+1}): accurate near 0
        delta = torch.atan2(sigma[1:] * alpha[:-1] - alpha[1:] * sigma[:-1],
                            alpha[1:] * alpha[:-1] + sigma[1:] * sigma[:-1])
        self._knots = (alpha, sigma, torch.cat([delta, delta[-1:]]))  # Δ_N := Δ_{N−1}: the left derivative at t = 1
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, ...]] = {}

    def _knots_on(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        key = (device, dtype)
        if key not in self._cache:
            self._cache[key] = tuple(k.to(device=device, dtype=dtype) for k in self._knots)
        return self._cache[key]

    def coefficients(self, t: torch.Tensor | float) -> Coefficients:
        """(α_t, σ_t, α'_t, σ'_t) by angle interpolation (class docstring); computed in float64 (float32 on MPS)
        so float32 knot times stay on their knots, returned in t's dtype."""
        t = as_time(t)
        out_dtype = t.dtype
        wide = torch.float32 if t.device.type == "mps" else torch.float64
        alpha_k, sigma_k, delta_k = self._knots_on(t.device, wide)
        n = self.num_train_steps
        u = t.to(wide).clamp(0.0, 1.0) * n
        j = u.floor().long().clamp(0, n)
        w = u - j.to(wide)
        delta = delta_k[j]
        cos, sin = torch.cos(w * delta), torch.sin(w * delta)
        a0, s0 = alpha_k[j], sigma_k[j]
        alpha = a0 * cos - s0 * sin  # cos(φ_j + wΔ)
        sigma = s0 * cos + a0 * sin  # sin(φ_j + wΔ)
        dphi = n * delta
        coefficients = (alpha, sigma, -sigma * dphi, alpha * dphi)
        return tuple(c.to(out_dtype) for c in coefficients)  # type: ignore[return-value]

    def time_of_step(self, k: torch.Tensor | int) -> torch.Tensor:
        """t = (N − 1 − k) / N (float64)."""
        return discrete_step_time(k, self.num_train_steps)

    def step_of_time(self, t: torch.Tensor | float) -> torch.Tensor:
        """k = N − 1 − N·t, the (continuous) diffusion step a DDPM-style network takes as its timestep input;
        t = 1 gives −1, the virtual clean step."""
        return (self.num_train_steps - 1) - self.num_train_steps * as_time(t)

    def __repr__(self) -> str:
        return (f"VPPath(schedule={self.schedule!r}, num_train_steps={self.num_train_steps}, "
                f"beta_start={self.beta_start}, beta_end={self.beta_end}, zero_terminal_snr={self.zero_terminal_snr})")


# -- a path by name ---------------------------------------------------------------------------------------------
PATHS: dict[str, type[AffinePath]] = {"flow_matching": FlowMatchingPath, "vp": VPPath}


def make_path(name: str, **kwargs: Any) -> AffinePath:
    """A path from a config: make_path("flow_matching", sigma_min=1e-5), make_path("vp", schedule="cosine",
    zero_terminal_snr=True); the keyword arguments go to the class."""
    if name not in PATHS:
        raise ValueError(f"unknown path {name!r}; choose one of {', '.join(PATHS)}")
    return PATHS[name](**kwargs)


# -- the flow-matching path as functions (older callers) ------------------------------------------------------------
def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, sigma_min: float = SIGMA_MIN) -> torch.Tensor:
    """X_t = t·X_1 + (1 − (1 − σ_min)·t)·X_0 for noise x0, data x1 [B, ...] and t [B]."""
    return FlowMatchingPath(sigma_min).sample(x1, t, noise=x0)[1]


def target_velocity(x0: torch.Tensor, x1: torch.Tensor, sigma_min: float = SIGMA_MIN) -> torch.Tensor:
    """V_t = X_1 − (1 − σ_min)·X_0 (independent of t: the paths are straight lines)."""
    return x1 - (1.0 - sigma_min) * x0


def sample_path(x1: torch.Tensor, t: torch.Tensor, sigma_min: float = SIGMA_MIN,
                noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(X_0, X_t, V_t) for data x1 at times t; X_0 ~ N(0, I) unless `noise` is given."""
    x0, x_t = FlowMatchingPath(sigma_min).sample(x1, t, noise)
    return x0, x_t, target_velocity(x0, x1, sigma_min)


def predicted_data(x_t: torch.Tensor, velocity: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """X̂_1 = X_t + (1 − t)·u: one Euler step to t = 1 (equals X_1 + σ_min·X_0 when u = V_t). The exact data estimate
    is `FlowMatchingPath(σ_min).convert(u, x_t, t, "velocity", "data")` (= X_1 when u = V_t)."""
    return x_t + (1.0 - expand_time(t, x_t)) * velocity
