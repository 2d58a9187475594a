"""The math of generation against hand computations: flow-matching path and target, logit-normal times, the
linear-quadratic schedule, Euler on a known linear flow, classifier-free guidance and window fusion."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from lightning_modules.generative import guidance, multidiffusion, paths, solvers, timesteps


# -- paths -------------------------------------------------------------------------------------------------------
def test_path_and_target_match_the_paper_by_hand() -> None:
    x0 = torch.tensor([[1.0, -2.0]])
    x1 = torch.tensor([[3.0, 0.5]])
    s = 1e-5
    t = torch.tensor([0.25])
    # X_t = t·X1 + (1 − (1 − σ)t)·X0 = 0.25·X1 + (1 − 0.99999·0.25)·X0
    expected = torch.tensor([[0.25 * 3.0 + (1 - 0.99999 * 0.25) * 1.0, 0.25 * 0.5 + (1 - 0.99999 * 0.25) * -2.0]])
    assert torch.allclose(paths.interpolate(x0, x1, t, s), expected, atol=1e-7)
    # V = X1 − (1 − σ)X0
    assert torch.allclose(paths.target_velocity(x0, x1, s), torch.tensor([[3.0 - 0.99999, 0.5 + 2 * 0.99999]]))
    assert paths.SIGMA_MIN == 1e-5
    # endpoints: pure noise at t = 0, data + σ·noise at t = 1
    assert torch.equal(paths.interpolate(x0, x1, torch.tensor([0.0]), s), x0)
    assert torch.allclose(paths.interpolate(x0, x1, torch.tensor([1.0]), s), x1 + s * x0)


def test_target_is_the_time_derivative_of_the_path() -> None:
    torch.manual_seed(0)
    x0, x1 = torch.randn(3, 4, 2, 5, 5), torch.randn(3, 4, 2, 5, 5)
    t, h = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64), 1e-6
    x0, x1 = x0.double(), x1.double()
    numeric = (paths.interpolate(x0, x1, t + h) - paths.interpolate(x0, x1, t - h)) / (2 * h)
    assert torch.allclose(numeric, paths.target_velocity(x0, x1), atol=1e-6)


def test_loss_is_the_mean_squared_error_and_predicted_data_inverts_the_path() -> None:
    pred, target = torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    assert paths.flow_matching_loss(pred, target).item() == pytest.approx((1 + 4 + 0 + 4) / 4)
    assert torch.allclose(paths.flow_matching_loss(pred, target, per_sample=True), torch.tensor([2.5, 2.0]))
    torch.manual_seed(1)
    x0, x1, t = torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0.3, 0.8])
    x_t = paths.interpolate(x0, x1, t)
    x1_hat = paths.predicted_data(x_t, paths.target_velocity(x0, x1), t)
    assert torch.allclose(x1_hat, x1 + paths.SIGMA_MIN * x0, atol=1e-6)
    with pytest.raises(ValueError, match="scalar or"):
        paths.interpolate(x0, x1, torch.tensor([0.1, 0.2, 0.3]))


# -- timesteps ----------------------------------------------------------------------------------------------------
def test_logit_normal_is_sigmoid_of_a_normal() -> None:
    g = torch.Generator().manual_seed(0)
    t = timesteps.logit_normal(200_000, generator=g)
    assert 0 < t.min() and t.max() < 1
    assert t.median().item() == pytest.approx(0.5, abs=0.01)
    # P(t < sigmoid(1)) = P(n < 1) = Φ(1) = 0.8413
    assert (t < 1 / (1 + math.exp(-1))).float().mean().item() == pytest.approx(0.8413, abs=0.005)
    shifted = timesteps.logit_normal(200_000, mean=1.0, std=0.5, generator=g)
    assert torch.logit(shifted).mean().item() == pytest.approx(1.0, abs=0.01)
    assert torch.logit(shifted).std().item() == pytest.approx(0.5, abs=0.01)


def test_time_shift_by_hand() -> None:
    t = torch.tensor([0.0, 0.5, 1.0])
    # σ = 0.5, α = 3: σ' = 1.5 / (1 + 2·0.5) = 0.75 → t' = 0.25; endpoints fixed
    assert torch.allclose(timesteps.shift_time(t, 3.0), torch.tensor([0.0, 0.25, 1.0]))
    assert torch.equal(timesteps.shift_time(t, 1.0), t)


def test_linear_quadratic_schedule_checks_and_a_hand_value() -> None:
    s, n = 50, 1000
    f = timesteps.linear_quadratic_schedule(s, n).double()
    assert f.shape == (51,)
    assert f[0] == 0 and f[-1] == 1
    assert f[25].item() == pytest.approx(0.025)  # f(L) = τ = L / N
    assert torch.all(f.diff() > 0)
    assert torch.allclose(f[:26].diff(), torch.full((25,), 1 / n, dtype=torch.float64), atol=1e-7)  # linear part: 1/N
    # quadratic part by hand: d = 25 − 0.025·50 = 23.75, a = d / (25·25²), b = 0.025/25 − 2d/25², c = a·25²
    d = 25 - 0.025 * 50
    a, b = d / (25 * 25**2), 0.025 / 25 - 2 * d / 25**2
    c = a * 25**2
    assert f[40].item() == pytest.approx(a * 1600 + b * 40 + c, abs=1e-6)
    # slope continuous at L: f'(L) = 2aL + b = τ/L, so the first quadratic step is f(L+1) − f(L) = τ/L + a
    assert f[26].item() - f[25].item() == pytest.approx(1 / n + a, abs=1e-7)
    assert torch.allclose(timesteps.uniform_schedule(4), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    with pytest.raises(ValueError, match="unknown schedule"):
        timesteps.schedule("cosine", 10)


# -- solvers ------------------------------------------------------------------------------------------------------
def test_euler_integrates_the_flow_toward_one_data_point_exactly() -> None:
    """For data concentrated at x1 the marginal velocity u(x, t) = (x1 − (1 − σ)x) / (1 − (1 − σ)t) is constant
    along straight paths, so Euler on any grid lands on X_1 = x1 + σ·x0."""
    s = paths.SIGMA_MIN
    torch.manual_seed(0)
    x0, x1 = torch.randn(2, 3, 4).double(), torch.randn(2, 3, 4).double()

    def u(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (x1 - (1 - s) * x) / (1 - (1 - s) * paths.expand_time(t, x))

    for grid in (torch.tensor([0.0, 0.1, 0.7, 1.0]), timesteps.linear_quadratic_schedule(8, 100)):
        out = solvers.euler(u, x0, grid.double())
        assert torch.allclose(out, x1 + s * x0, atol=1e-9)
    # a constant field: X_S = X_0 + (t_S − t_0)·c
    c = torch.ones(2, 3, 4)
    assert torch.allclose(solvers.euler(lambda x, t: c, torch.zeros_like(c), torch.tensor([0.0, 0.3, 1.0])), c)


def test_midpoint_is_exact_for_a_linear_in_time_field() -> None:
    # dx/dt = 2t → x(1) = x(0) + 1; Euler on [0, 0.5, 1] gives 0.5, midpoint gives 1 exactly
    field = lambda x, t: 2 * paths.expand_time(t, x) * torch.ones_like(x)
    x0, grid = torch.zeros(1, 2), torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(solvers.midpoint(field, x0, grid), torch.ones(1, 2))
    assert torch.allclose(solvers.euler(field, x0, grid), torch.full((1, 2), 0.5))
    with pytest.raises(ValueError, match="unknown solver"):
        solvers.solver("dopri5")


# -- guidance -----------------------------------------------------------------------------------------------------
def test_classifier_free_guidance_by_hand() -> None:
    cond, uncond = torch.tensor([3.0, 1.0]), torch.tensor([1.0, 1.0])
    # u = u_u + w (u_c − u_u) = [1 + 7.5·2, 1]
    assert torch.allclose(guidance.cfg_combine(cond, uncond, 7.5), torch.tensor([16.0, 1.0]))
    assert torch.equal(guidance.cfg_combine(cond, uncond, 1.0), cond)
    assert torch.equal(guidance.cfg_combine(cond, uncond, 0.0), uncond)

    def paired(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # first half "conditional": 2x; second: x
        b = x.shape[0] // 2
        return torch.cat([2 * x[:b], x[b:]])

    fn = guidance.classifier_free_guidance(paired, 3.0)
    x = torch.tensor([[1.0], [2.0], [-4.0]])  # three rows: a doubled batch of 6 splits only one way into halves
    assert torch.allclose(fn(x, torch.zeros(3)), x + 3.0 * (2 * x - x))


def test_two_condition_guidance_in_one_batched_pass_by_hand() -> None:
    """InstructPix2Pix's formula through `guided`: pass i of the repeated batch answers x·(1, 2, 5)[i], so with
    s_I = 1.5, s_T = 3: p = x + 1.5·(2x − x) + 3·(5x − 2x) = 11.5x. Also t is repeated per pass, and one call."""
    calls = []

    def batched(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append((x.shape[0], t.clone()))
        b = x.shape[0] // 3
        return torch.cat([x[:b], 2 * x[b : 2 * b], 5 * x[2 * b :]])

    x, t = torch.tensor([[1.0], [-2.0]]), torch.tensor([0.25, 0.75])
    assert torch.allclose(guidance.guided(batched, [1.5, 3.0])(x, t), 11.5 * x)
    assert len(calls) == 1 and calls[0][0] == 6 and torch.equal(calls[0][1], t.repeat(3))
    assert torch.allclose(guidance.combine([x, 2 * x, 5 * x], [1.5, 3.0]), 11.5 * x)
    with pytest.raises(ValueError, match="at least one scale"):
        guidance.guided(batched, [])
    with pytest.raises(ValueError, match="expected 2 x 2"):
        guidance.guided(lambda x, t: x[:2], [1.0])(x, t)  # returned one pass instead of two
    with pytest.raises(ValueError, match="len\\(predictions\\)"):
        guidance.combine([x], [])


def test_guidance_interval_guides_only_inside_it() -> None:
    """With interval [0.3, 0.6] the same passes (x, 3x) give u + 4·(c − u) = 9x at t = 0.3, 0.45 and 0.6 and the
    conditional 3x outside (t = 0.1, 0.9), for a scalar t and a per-sample t alike."""
    def batched(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b = x.shape[0] // 2
        return torch.cat([x[:b], 3 * x[b:]])

    x = torch.tensor([[1.0], [-2.0]])
    fn = guidance.guided(batched, [4.0], interval=[0.3, 0.6])
    for t, factor in [(0.1, 3.0), (0.3, 9.0), (0.45, 9.0), (0.6, 9.0), (0.9, 3.0)]:
        assert torch.allclose(fn(x, torch.tensor(t)), factor * x), t
        assert torch.allclose(fn(x, torch.full((2,), t)), factor * x), t
    assert torch.allclose(guidance.guided(batched, [4.0])(x, torch.tensor(0.9)), 9 * x)  # no interval: everywhere
    with pytest.raises(ValueError, match="guidance interval"):
        guidance.guided(batched, [4.0], interval=[0.7, 0.2])


# -- multidiffusion -----------------------------------------------------------------------------------------------
def test_window_spans_and_weights() -> None:
    assert multidiffusion.window_spans(10, 4, 1) == [(0, 4), (3, 7), (6, 10)]
    assert multidiffusion.window_spans(11, 4, 1) == [(0, 4), (3, 7), (6, 10), (7, 11)]
    assert multidiffusion.window_spans(3, 14, 4) == [(0, 3)]
    assert multidiffusion.window_spans(24, 14, 4) == [(0, 14), (10, 24)]
    w = multidiffusion.window_weights(5, "triangular", eps=0.0)
    assert torch.allclose(w, torch.tensor([0.0, 0.5, 1.0, 0.5, 0.0]))
    with pytest.raises(ValueError):
        multidiffusion.window_spans(10, 4, 4)


def test_window_edges_and_the_default_floor() -> None:
    assert multidiffusion.window_spans(4, 4, 0) == [(0, 4)]  # exactly one window long: one span
    assert multidiffusion.window_spans(5, 1, 0) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]  # a window of 1 works
    assert multidiffusion.window_spans(6, 2, 1)[:2] == [(0, 2), (1, 3)]  # overlap 0 < 1 < 2 is allowed
    for window, overlap in [(0, 0), (4, -1), (4, 4), (4, 5)]:
        with pytest.raises(ValueError, match="need window >= 1"):
            multidiffusion.window_spans(10, window, overlap)
    # the default eps keeps the end frames' weight just above 0 (so a frame covered by one window is defined)
    assert torch.allclose(multidiffusion.window_weights(3, "triangular"), torch.tensor([1e-3, 1.0 + 1e-3, 1e-3]))
    assert torch.equal(multidiffusion.window_weights(1, "triangular"), torch.ones(1))


def test_fuse_windows_averages_overlaps_by_hand() -> None:
    x = torch.arange(6.0).view(1, 1, 6)
    # each window returns its own index (0, 1, 2) everywhere: windows [0,3), [2,5), [3,6)
    spans = multidiffusion.window_spans(6, 3, 1)
    assert spans == [(0, 3), (2, 5), (3, 6)]
    fn = lambda piece, span: torch.full_like(piece, float(spans.index(span)))
    out = multidiffusion.fuse_windows(fn, x, 3, 1, dim=2)
    # position 2: windows 0, 1 → 0.5; positions 3, 4: windows 1, 2 → 1.5; 5: window 2
    assert torch.allclose(out, torch.tensor([[[0.0, 0.0, 0.5, 1.5, 1.5, 2.0]]]))
    # a pointwise function is unchanged by fusion, whatever the weights
    for weighting in ("uniform", "triangular"):
        y = multidiffusion.fuse_windows(lambda piece, span: piece**2, x, 3, 1, dim=2, weighting=weighting)
        assert torch.allclose(y, x**2)


def test_defaults_are_the_papers_constants() -> None:
    """Movie Gen: sigma_min 1e-5, 50 solver steps emulating 1000, logit-normal(0, 1) training times; latent
    diffusion's scaled-linear betas 0.00085 .. 0.012 over 1000 steps (reference notes)."""
    def defaults(fn) -> dict:
        return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not inspect._empty}

    assert paths.FlowMatchingPath().sigma_min == 1e-5
    paper = {"schedule": "scaled_linear", "num_train_steps": 1000, "beta_start": 0.00085, "beta_end": 0.012}
    assert paper.items() <= defaults(paths.VPPath.__init__).items() and paper.items() <= defaults(paths.vp_betas).items()
    assert defaults(timesteps.linear_quadratic_schedule) == {"num_steps": 50, "emulated_steps": 1000}
    assert {"mean": 0.0, "std": 1.0}.items() <= defaults(timesteps.logit_normal).items()
    # a scalar time is broadcast to the batch
    assert torch.equal(paths.expand_time(0.5, torch.zeros(3, 2, 4)), torch.full((3, 1, 1), 0.5))
