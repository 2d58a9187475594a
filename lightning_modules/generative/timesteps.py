"""Times for training (a sampler) and for inference (a schedule), in the t = 0 noise, t = 1 data convention.

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

Shifted (SD3-style resolution shift, same map as above): t_i = shift_time(i / S, α).

VP (DDIM) spacings: S of the N training steps k (k = N−1 noisiest), as diffusers' DDIMScheduler `timestep_spacing`
and Lin et al. 2024 (arXiv 2305.08891, Table 2; the paper counts steps from 1, we from 0):

    linspace   k_i = round(i·(N − 1)/(S − 1)),         i = 0..S−1     (N=1000, S=10: 0, 111, 222, ..., 999)
    leading    k_i = i·⌊N/S⌋ + steps_offset,           i = 0..S−1     (0, 100, ..., 900; SD 1.x uses offset 1)
    trailing   k_i = round(N − i·N/S) − 1,             i = 0..S−1     (999, 899, ..., 99)

listed noisiest first and mapped to time by `paths.discrete_step_time` (t = (N − 1 − k)/N), then t = 1 (the clean
data, which VPPath puts one virtual step after k = 0) is appended, so a solver ends on the clean estimate.
Only "trailing" and "linspace" start from the noisiest step (t = 0); "leading" starts at k = (S − 1)·⌊N/S⌋ (t = 0.099
for N = 1000, S = 10) and never visits the noisiest steps, one of the flaws Lin et al. point out.
"""

from __future__ import annotations

import torch

from lightning_modules.generative.paths import discrete_step_time

VP_SPACINGS = ("leading", "trailing", "linspace")
SCHEDULES = ("linear_quadratic", "uniform", "shifted", *VP_SPACINGS)


def logit_normal(batch_size: int, mean: float = 0.0, std: float = 1.0, *, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """t = sigmoid(n), n ~ N(mean, std²): [batch_size] times in (0, 1)."""
    n = torch.randn(batch_size, generator=generator, device=device)
    return torch.sigmoid(mean + std * n)


def uniform_times(batch_size: int, *, generator: torch.Generator | None = None,
                  device: torch.device | str | None = None, discrete_steps: int | None = None) -> torch.Tensor:
    """Training times: t ~ U[0, 1) ([batch_size]); with `discrete_steps` N, t = j/N with j uniform in {0..N−1},
    i.e. the VP step k = N − 1 − j uniform in {0..N−1} (DDPM training; never the clean t = 1)."""
    if discrete_steps is None:
        return torch.rand(batch_size, generator=generator, device=device)
    j = torch.randint(0, int(discrete_steps), (batch_size,), generator=generator, device=device)
    return j.float() / discrete_steps


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


def shifted_schedule(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """t_i = shift_time(i / S, shift), i = 0..S: [S + 1] times from 0 to 1, crowded toward noise when shift > 1."""
    return shift_time(uniform_schedule(num_steps), shift)


def vp_steps(spacing: str, num_steps: int, train_steps: int = 1000, steps_offset: int = 0) -> torch.Tensor:
    """The S discrete VP steps k (int64 [S], noisiest first) of a DDIM spacing (see the module docstring);
    `steps_offset` applies to "leading" only, as in diffusers."""
    n, s = int(train_steps), int(num_steps)
    if not 1 <= s <= n:
        raise ValueError(f"need 1 <= num_steps <= train_steps, got num_steps={num_steps}, train_steps={train_steps}")
    i = torch.arange(s, dtype=torch.float64)
    if spacing == "leading":
        k = i * (n // s) + steps_offset
    elif spacing == "trailing":
        k = torch.round(n - i * n / s) - 1  # computed per i (not arange with a float step: no spurious extra step)
        return k.long()
    elif spacing == "linspace":
        k = torch.round(torch.linspace(0, n - 1, s, dtype=torch.float64))  # round half to even, as numpy
    else:
        raise ValueError(f"unknown VP spacing {spacing!r}; choose one of {', '.join(VP_SPACINGS)}")
    k = k.long().flip(0)
    if int(k.max()) > n - 1 or int(k.min()) < 0:
        raise ValueError(f"steps_offset={steps_offset} puts a step outside [0, {n - 1}]")
    return k


def vp_schedule(spacing: str, num_steps: int, train_steps: int = 1000, steps_offset: int = 0) -> torch.Tensor:
    """[S + 1] increasing float64 times: t = (N − 1 − k)/N for the `vp_steps`, then 1.0 (clean data). float64 so
    that N·t is a whole number and VPPath reads its knots exactly."""
    k = vp_steps(spacing, num_steps, train_steps, steps_offset)
    return torch.cat([discrete_step_time(k, train_steps), torch.ones(1, dtype=torch.float64)])


def schedule(name: str, num_steps: int, emulated_steps: int = 1000, shift: float = 1.0, train_steps: int = 1000,
             steps_offset: int = 0) -> torch.Tensor:
    """A schedule by name: [S + 1] increasing times from the start time to 1.

    "linear_quadratic" (emulated_steps), "uniform", "shifted" (shift), or a VP spacing "leading", "trailing",
    "linspace" (train_steps = the VPPath's num_train_steps, steps_offset)."""
    if name == "linear_quadratic":
        return linear_quadratic_schedule(num_steps, emulated_steps)
    if name == "uniform":
        return uniform_schedule(num_steps)
    if name == "shifted":
        return shifted_schedule(num_steps, shift)
    if name in VP_SPACINGS:
        return vp_schedule(name, num_steps, train_steps, steps_offset)
    raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
