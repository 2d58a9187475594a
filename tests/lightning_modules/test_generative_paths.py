"""Affine paths against hand computations: flow-matching and VP (linear, scaled_linear, cosine, zero terminal SNR)
coefficients and derivatives, every prediction conversion (hand formulas and round trips, float64), the registry,
and a peer check of the flow-matching path and conversions against Meta's `flow_matching` package."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lightning_modules.generative import paths

PREDICTIONS = ("velocity", "epsilon", "data", "v")


def _vp_alphas_cumprod_by_hand(betas: list[float]) -> list[float]:
    out, prod = [], 1.0
    for beta in betas:
        prod *= 1.0 - beta
        out.append(prod)
    return out


# -- flow matching ------------------------------------------------------------------------------------------------
def test_flow_matching_coefficients_by_hand() -> None:
    s = 1e-5
    path = paths.FlowMatchingPath(s)
    t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    alpha, sigma, d_alpha, d_sigma = path.coefficients(t)
    assert torch.equal(alpha, t)
    assert torch.allclose(sigma, torch.tensor([1.0, 1 - 0.99999 * 0.3, s], dtype=torch.float64), rtol=0, atol=1e-15)
    assert torch.equal(d_alpha, torch.ones(3, dtype=torch.float64))
    assert torch.allclose(d_sigma, torch.full((3,), -0.99999, dtype=torch.float64), rtol=0, atol=1e-15)
    assert path.alpha(0.3).item() == pytest.approx(0.3) and path.sigma(0.3).item() == pytest.approx(1 - 0.99999 * 0.3)
    # the module functions are this path
    torch.manual_seed(0)
    x0, x1, tb = torch.randn(3, 2, 4), torch.randn(3, 2, 4), torch.rand(3)
    x0_, x_t, v = paths.sample_path(x1, tb, s, x0)
    assert torch.equal(x0_, x0)
    assert torch.equal(x_t, paths.interpolate(x0, x1, tb, s))
    assert torch.allclose(v, path.target(x0, x1, tb, "velocity"), atol=1e-7)
    assert torch.allclose(path.loss(v + 1.0, x0, x1, tb), torch.tensor(1.0))


# -- VP -------------------------------------------------------------------------------------------------------------
def test_vp_betas_by_hand() -> None:
    n = 1000
    sl = paths.vp_betas("scaled_linear", n, 0.00085, 0.012)
    root = lambda k: (math.sqrt(0.00085) + (math.sqrt(0.012) - math.sqrt(0.00085)) * k / (n - 1)) ** 2
    for k in (0, 1, 500, 998, 999):
        assert sl[k].item() == pytest.approx(root(k), rel=1e-12)
    assert sl[0].item() == pytest.approx(0.00085, rel=1e-12) and sl[-1].item() == pytest.approx(0.012, rel=1e-12)
    lin = paths.vp_betas("linear", n, 1e-4, 0.02)
    for k in (0, 333, 999):
        assert lin[k].item() == pytest.approx(1e-4 + (0.02 - 1e-4) * k / (n - 1), rel=1e-12)

    # cosine (Nichol & Dhariwal eq. 17): ᾱ_k = f((k+1)/N)/f(0), f(s) = cos²((s + 0.008)/1.008·π/2); last β clipped
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    cos_path = paths.VPPath("cosine", n)
    for k in (0, 1, 499, 900, 998):
        assert cos_path.alphas_cumprod[k].item() == pytest.approx(f((k + 1) / n) / f(0.0), rel=1e-10)
    assert cos_path.betas[-1].item() == pytest.approx(0.999)
    assert cos_path.alphas_cumprod[-1].item() == pytest.approx(cos_path.alphas_cumprod[-2].item() * 0.001, rel=1e-10)
    assert bool((cos_path.betas[:-1] < 0.999).all())

    sd = paths.VPPath("scaled_linear", n)
    by_hand = _vp_alphas_cumprod_by_hand([root(k) for k in range(n)])
    for k in (0, 10, 500, 999):
        assert sd.alphas_cumprod[k].item() == pytest.approx(by_hand[k], rel=1e-10)
    assert sd.alphas_cumprod[-1].item() == pytest.approx(0.0046601, abs=1e-6)  # SD's well-known nonzero terminal ᾱ
    with pytest.raises(ValueError, match="unknown VP schedule 'sqrt'"):
        paths.VPPath("sqrt")


@pytest.mark.parametrize("schedule", ["scaled_linear", "linear", "cosine"])
def test_zero_terminal_snr_rescale(schedule: str) -> None:
    plain = paths.VPPath(schedule, 1000)
    ztsnr = paths.VPPath(schedule, 1000, zero_terminal_snr=True)
    a, b = plain.alphas_cumprod, ztsnr.alphas_cumprod
    assert b[-1].item() == 0.0  # exactly zero SNR at the last step
    assert b[0].item() == pytest.approx(a[0].item(), rel=0, abs=1e-15)  # the first keeps its value
    r0, rl = math.sqrt(a[0].item()), math.sqrt(a[-1].item())
    for k in (1, 250, 700):
        hand = ((math.sqrt(a[k].item()) - rl) * r0 / (r0 - rl)) ** 2
        assert b[k].item() == pytest.approx(hand, rel=1e-12)
    # betas stay consistent with ᾱ: Π(1 − β) = ᾱ, and the last β is 1
    assert torch.allclose(torch.cumprod(1 - ztsnr.betas, 0), b, rtol=0, atol=1e-14)
    assert ztsnr.betas[-1].item() == 1.0
    # continuous time: α(0) = 0, σ(0) = 1 exactly
    assert ztsnr.alpha(0.0).item() == 0.0 and ztsnr.sigma(0.0).item() == 1.0


@pytest.mark.parametrize("kwargs", [{}, {"schedule": "cosine"}, {"zero_terminal_snr": True},
                                    {"schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
                                     "num_train_steps": 50}])
def test_vp_continuous_time_knots_angle_and_derivatives(kwargs: dict) -> None:
    path = paths.VPPath(**kwargs)
    n = path.num_train_steps
    abar = path.alphas_cumprod
    k = torch.arange(n)
    # knots: α(t_k)² = ᾱ_k at t = (N − 1 − k)/N; t = 1 is clean
    t_k = path.time_of_step(k)
    assert torch.allclose(t_k, (n - 1 - k.double()) / n)
    assert torch.allclose(path.alpha(t_k) ** 2, abar, rtol=0, atol=1e-14)
    assert torch.allclose(path.sigma(t_k) ** 2, 1 - abar, rtol=0, atol=1e-14)
    assert torch.allclose(path.step_of_time(t_k), k.double())
    one = torch.ones(1, dtype=torch.float64)
    assert path.alpha(one).item() == 1.0 and path.sigma(one).item() == 0.0
    # VP everywhere
    t = torch.rand(200, dtype=torch.float64)
    alpha, sigma, d_alpha, d_sigma = path.coefficients(t)
    assert torch.allclose(alpha**2 + sigma**2, torch.ones_like(t), rtol=0, atol=1e-14)
    # between knots the angle φ = acos(α) is linear: a quarter of the way from knot j (step N−1−j) to j+1
    phi = lambda ab: math.acos(math.sqrt(ab))
    for j in (0, n // 3, n - 2):
        phi_j, phi_next = phi(abar[n - 1 - j].item()), phi(abar[n - 2 - j].item())
        tq = torch.tensor([(j + 0.25) / n], dtype=torch.float64)
        assert path.alpha(tq).item() == pytest.approx(math.cos(phi_j + 0.25 * (phi_next - phi_j)), abs=1e-12)
        # φ' = N·(φ_{j+1} − φ_j), α' = −σ·φ', σ' = α·φ'
        dphi = n * (phi_next - phi_j)
        assert path.d_alpha(tq).item() == pytest.approx(-path.sigma(tq).item() * dphi, rel=1e-9, abs=1e-12)
        assert path.d_sigma(tq).item() == pytest.approx(path.alpha(tq).item() * dphi, rel=1e-9, abs=1e-12)
    # the last segment reaches the clean knot: φ goes from acos(√ᾱ_0) to 0
    tq = torch.tensor([1 - 0.5 / n], dtype=torch.float64)
    assert path.alpha(tq).item() == pytest.approx(math.cos(0.5 * phi(abar[0].item())), abs=1e-12)
    # derivatives are those of α and σ (central differences inside segments)
    t = (torch.randint(0, n, (50,)).double() + 0.1 + 0.8 * torch.rand(50, dtype=torch.float64)) / n
    h = 1e-4 / n
    assert torch.allclose((path.alpha(t + h) - path.alpha(t - h)) / (2 * h), path.d_alpha(t), rtol=1e-6, atol=1e-8)
    assert torch.allclose((path.sigma(t + h) - path.sigma(t - h)) / (2 * h), path.d_sigma(t), rtol=1e-6, atol=1e-8)
    # α increases and σ decreases toward data
    grid = torch.linspace(0, 1, 1001, dtype=torch.float64)
    assert bool((path.alpha(grid).diff() >= 0).all()) and bool((path.sigma(grid).diff() <= 0).all())


# -- conversions --------------------------------------------------------------------------------------------------
PATH_CASES = {
    "fm": lambda: paths.FlowMatchingPath(1e-5),
    "fm0": lambda: paths.FlowMatchingPath(0.0),
    "vp_sd": lambda: paths.VPPath(),
    "vp_cos_ztsnr": lambda: paths.VPPath("cosine", zero_terminal_snr=True),
}


def _hand_targets(path: paths.AffinePath, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> dict:
    a, s, da, ds = (c.view(-1, 1, 1) for c in path.coefficients(t))
    return {"velocity": da * x1 + ds * x0, "epsilon": x0, "data": x1, "v": a * x0 - s * x1}


@pytest.mark.parametrize("case", list(PATH_CASES))
def test_targets_and_every_conversion_round_trip(case: str) -> None:
    path = PATH_CASES[case]()
    g = torch.Generator().manual_seed(3)
    x0, x1 = torch.randn(2, 6, 3, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([0.02, 0.2, 0.45, 0.5, 0.8, 0.97], dtype=torch.float64)
    x0_, x_t = path.sample(x1, t, noise=x0)
    alpha, sigma = path.alpha(t).view(-1, 1, 1), path.sigma(t).view(-1, 1, 1)
    assert torch.equal(x0_, x0) and torch.allclose(x_t, alpha * x1 + sigma * x0, atol=1e-15)
    hand = _hand_targets(path, x0, x1, t)
    for p in PREDICTIONS:
        target = path.target(x0, x1, t, p)
        assert torch.allclose(target, hand[p], rtol=0, atol=1e-14), p
        # the pair (data, noise) is recovered exactly from any prediction
        d, e = path.to_data_noise(target, x_t, t, p)
        assert torch.allclose(d, x1, rtol=0, atol=1e-9) and torch.allclose(e, x0, atol=1e-9), p
    for p, q in itertools.product(PREDICTIONS, PREDICTIONS):
        assert torch.allclose(path.convert(hand[p], x_t, t, p, q), hand[q], rtol=0, atol=1e-9), (p, q)
    # the velocity is the time derivative of the path (central difference of X_t at fixed x0, x1), away from the
    # VP knots at multiples of 1/1000 where the interpolated path has a kink
    tm, h = t + 3.7e-4, 1e-7
    numeric = (path.sample(x1, tm + h, x0)[1] - path.sample(x1, tm - h, x0)[1]) / (2 * h)
    assert torch.allclose(numeric, path.target(x0, x1, tm, "velocity"), atol=1e-6)


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-12) -> bool:
    return torch.allclose(a, b, rtol=0, atol=atol)


def test_conversions_by_hand_formulas() -> None:
    """A model output is not a target: check the inverse formulas on an arbitrary output at arbitrary X_t."""
    g = torch.Generator().manual_seed(4)
    out, x_t = torch.randn(2, 2, 7, generator=g, dtype=torch.float64)
    t = torch.tensor([0.3, 0.75], dtype=torch.float64)
    # flow matching: D = α σ' − σ α' = −t(1 − s) − (1 − (1 − s)t) = −1
    s = 1e-5
    fm = paths.FlowMatchingPath(s)
    tt, c = t.view(-1, 1), 1 - s
    sig = 1 - c * tt
    d, e = fm.to_data_noise(out, x_t, t, "velocity")
    assert _close(d, c * x_t + sig * out) and _close(e, x_t - tt * out)
    d, e = fm.to_data_noise(out, x_t, t, "epsilon")
    assert _close(d, (x_t - sig * out) / tt) and torch.equal(e, out)
    d, e = fm.to_data_noise(out, x_t, t, "data")
    assert torch.equal(d, out) and _close(e, (x_t - tt * out) / sig)
    d, e = fm.to_data_noise(out, x_t, t, "v")
    nrm = tt**2 + sig**2
    assert _close(d, (tt * x_t - sig * out) / nrm) and _close(e, (sig * x_t + tt * out) / nrm)
    # VP, v-prediction (Salimans & Ho): x̂ = α z − σ v, ε̂ = σ z + α v; and u = φ'·v
    vp = paths.VPPath()
    a, sg, da, _ = (q.view(-1, 1) for q in vp.coefficients(t))
    d, e = vp.to_data_noise(out, x_t, t, "v")
    assert _close(d, a * x_t - sg * out) and _close(e, sg * x_t + a * out)
    dphi = -da / sg  # α' = −σ φ'
    assert _close(vp.convert(out, x_t, t, "v", "velocity"), dphi * out)
    # ε → data, DDPM's x̂_0 = (x_t − √(1−ᾱ) ε) / √ᾱ
    assert _close(vp.convert(out, x_t, t, "epsilon", "data"), (x_t - sg * out) / a)
    # scalar and [B] times agree; wrong shapes and names fail with one line
    assert _close(vp.convert(out[:1], x_t[:1], 0.3, "v", "data"), vp.convert(out[:1], x_t[:1], t[:1], "v", "data"))
    with pytest.raises(ValueError, match="scalar or"):
        vp.to_data_noise(out, x_t, torch.rand(3), "v")
    with pytest.raises(ValueError, match="unknown prediction 'x0'; choose one of velocity, epsilon, data, v"):
        vp.convert(out, x_t, t, "x0", "v")
    with pytest.raises(ValueError, match="unknown prediction"):
        vp.target(out, out, t, "noise")


def test_float32_inputs_keep_float32_and_vp_knots_stay_exact() -> None:
    vp = paths.VPPath()
    x = torch.randn(2, 3)
    x0, x_t = vp.sample(x, torch.tensor([0.5, 0.9]))
    assert x_t.dtype == torch.float32
    # a Python time is taken in float64: α at the knot of step 100 is √ᾱ_100 to float64 precision
    alpha = vp.expanded(0.899, torch.zeros(1, dtype=torch.float64))[0]
    assert alpha.item() == pytest.approx(math.sqrt(vp.alphas_cumprod[100].item()), abs=1e-15)


def test_make_path() -> None:
    fm = paths.make_path("flow_matching", sigma_min=1e-3)
    assert isinstance(fm, paths.FlowMatchingPath) and fm.sigma_min == 1e-3
    vp = paths.make_path("vp", schedule="cosine", zero_terminal_snr=True)
    assert isinstance(vp, paths.VPPath) and vp.schedule == "cosine" and vp.alphas_cumprod[-1] == 0
    assert "cosine" in repr(vp)
    with pytest.raises(ValueError, match=r"^unknown path 'edm'; choose one of flow_matching, vp$"):
        paths.make_path("edm")


# -- peer: Meta's flow_matching package (a dev dependency) -------------------------------------------------------

def _scheduler_from(path: paths.AffinePath):
    """Our coefficients as a flow_matching Scheduler (their conversions are written against any scheduler)."""
    from flow_matching.path.scheduler.scheduler import Scheduler, SchedulerOutput

    class Ours(Scheduler):
        def __call__(self, t: torch.Tensor) -> SchedulerOutput:
            a, s, da, ds = path.coefficients(t)
            return SchedulerOutput(alpha_t=a, sigma_t=s, d_alpha_t=da, d_sigma_t=ds)

        def snr_inverse(self, snr: torch.Tensor) -> torch.Tensor:
            raise NotImplementedError

    return Ours()


def _sigma_min_scheduler(sigma_min: float):
    """α_t = t, σ_t = 1 − (1 − σ_min)t written independently of our code, as their Scheduler."""
    from flow_matching.path.scheduler.scheduler import Scheduler, SchedulerOutput

    class SigmaMin(Scheduler):
        def __call__(self, t: torch.Tensor) -> SchedulerOutput:
            return SchedulerOutput(alpha_t=t, sigma_t=1 - (1 - sigma_min) * t, d_alpha_t=torch.ones_like(t),
                                   d_sigma_t=torch.full_like(t, -(1 - sigma_min)))

        def snr_inverse(self, snr: torch.Tensor) -> torch.Tensor:
            raise NotImplementedError

    return SigmaMin()


def test_peer_flow_matching_path_and_target() -> None:
    pytest.importorskip("flow_matching")
    from flow_matching.path import AffineProbPath, CondOTProbPath

    g = torch.Generator().manual_seed(5)
    x0, x1 = torch.randn(2, 8, 3, 4, generator=g, dtype=torch.float64)
    t = torch.rand(8, generator=g, dtype=torch.float64)
    for ours, theirs in ((paths.FlowMatchingPath(0.0), CondOTProbPath()),
                         (paths.FlowMatchingPath(1e-5), AffineProbPath(_sigma_min_scheduler(1e-5))),
                         (paths.FlowMatchingPath(0.1), AffineProbPath(_sigma_min_scheduler(0.1)))):
        sample = theirs.sample(x_0=x0, x_1=x1, t=t)
        _, x_t = ours.sample(x1, t, noise=x0)
        assert (x_t - sample.x_t).abs().max().item() <= 1e-6
        assert (ours.target(x0, x1, t, "velocity") - sample.dx_t).abs().max().item() <= 1e-6
        if ours.sigma_min == 0.0:
            assert (paths.interpolate(x0, x1, t, 0.0) - sample.x_t).abs().max().item() <= 1e-6


@pytest.mark.parametrize("case", ["fm", "vp_sd", "vp_cos_ztsnr"])
def test_peer_prediction_conversions(case: str) -> None:
    """Their six conversions (x_1 ↔ ε ↔ velocity) on our coefficients equal our convert()."""
    pytest.importorskip("flow_matching")
    from flow_matching.path import AffineProbPath

    path = PATH_CASES[case]()
    theirs = AffineProbPath(_scheduler_from(path))
    g = torch.Generator().manual_seed(6)
    out, x_t = torch.randn(2, 5, 2, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9], dtype=torch.float64)
    te = t.view(-1, 1, 1)  # their converters do not broadcast t themselves
    pairs = {("data", "velocity"): theirs.target_to_velocity, ("epsilon", "velocity"): theirs.epsilon_to_velocity,
             ("velocity", "data"): theirs.velocity_to_target, ("epsilon", "data"): theirs.epsilon_to_target,
             ("velocity", "epsilon"): theirs.velocity_to_epsilon, ("data", "epsilon"): theirs.target_to_epsilon}
    for (src, dst), fn in pairs.items():
        expected = fn(out, x_t, te)
        got = path.convert(out, x_t, t, src, dst)
        assert (got - expected).abs().max().item() <= 1e-6 * max(1.0, expected.abs().max().item()), (src, dst)


# -- the noise prior ----------------------------------------------------------------------------------------------
def test_frame_correlated_noise_keeps_unit_variance_and_correlates_frames_by_a2_over_1_plus_a2() -> None:
    """PYoCo's mixed prior: the per-element correlation between two frames, measured over many draws, is
    a²/(1 + a²) (a = 1: 0.5, a = 3: 0.9), the variance stays 1, and a = 0 is the i.i.d. noise itself."""
    g = torch.Generator().manual_seed(0)
    noise, shared = torch.randn(64, 4, 3, 16, 16, generator=g), torch.randn(64, 4, 1, 16, 16, generator=g)
    assert paths.correlate_frames(noise, shared, 0.0) is noise
    for a in (1.0, 3.0):
        x = paths.correlate_frames(noise, shared, a)
        assert x.var().item() == pytest.approx(1.0, abs=0.03)
        f0, f2 = x[:, :, 0].flatten(), x[:, :, 2].flatten()
        assert torch.corrcoef(torch.stack([f0, f2]))[0, 1].item() == pytest.approx(a * a / (1 + a * a), abs=0.02)
    with pytest.raises(ValueError, match="shared"):
        paths.correlate_frames(noise, shared[:, :, :, :8], 1.0)


def test_progressive_frames_correlation_decays_with_frame_distance():
    """PYoCo's progressive prior: frames f and g correlate by rho^|f - g|, rho = a / sqrt(1 + a²) (a = 1: 0.707,
    0.5 at distance 2, 0.354 at 3), every frame keeps variance 1, and a = 0 is the i.i.d. noise itself."""
    noise = torch.randn(64, 4, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    assert paths.progressive_frames(noise, 0.0) is noise
    x = paths.progressive_frames(noise, 1.0)
    assert torch.equal(x[:, :, 0], noise[:, :, 0])
    rho = 1.0 / math.sqrt(2.0)
    for f in range(4):
        assert x[:, :, f].var().item() == pytest.approx(1.0, abs=0.03)
        corr = torch.corrcoef(torch.stack([x[:, :, 0].flatten(), x[:, :, f].flatten()]))[0, 1].item()
        assert corr == pytest.approx(rho**f, abs=0.02)
    with pytest.raises(ValueError, match="progressive_frames"):
        paths.progressive_frames(noise[:, :, 0], 1.0)
