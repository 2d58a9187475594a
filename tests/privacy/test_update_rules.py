"""The four clip rules and DP optimizers against hand computations, with real Opacus per-sample hooks."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from opacus.grad_sample import GradSampleHooks
from torch import nn

from lightning_modules.privacy import clipping
from lightning_modules.privacy.optimizers import (
    DPSGDFOptimizer,
    DPSGDGlobalAdaptOptimizer,
    DPSGDGlobalOptimizer,
    PrivateOptimizer,
)

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook")
C0 = 1.0


def test_factors_by_hand():
    norms = torch.tensor([0.5, 2.0, 4.0])
    assert torch.allclose(clipping.dpsgd_factors(norms, C0), torch.tensor([1.0, 0.5, 0.25]))
    # Global, Z = 3: the first two scaled by C0/Z, the third dropped
    assert torch.allclose(clipping.global_factors(norms, C0, 3.0), torch.tensor([1 / 3, 1 / 3, 0.0]))
    # Global-Adapt, Z = 3: C0 / max(||g||, Z)
    assert torch.allclose(clipping.global_adapt_factors(norms, C0, 3.0), torch.tensor([1 / 3, 1 / 3, 1 / 4]))


def test_dpsgd_f_bounds_paper_rule_by_hand():
    # Alg. 4: C_k = C0 (1 + (m~_k / b~_k) / (m~ / |B|)), an empty group keeps ratio 1.
    # group 0: 3 clipped of 4; group 1: 1 clipped of 5; group 2: empty; m~ = 4; actual |B| = 10 (the noisy
    # counts sum to 9): m~ / |B| = 0.4 -> C = 2 (1 + 0.75 / 0.4), 2 (1 + 0.2 / 0.4), 2 (1 + 1 / 0.4)
    clipped, unclipped = torch.tensor([3.0, 1.0, 0.0]), torch.tensor([1.0, 4.0, 0.0])
    bounds = clipping.dpsgd_f_bounds(clipped, unclipped, 2.0, batch_size=10)
    assert torch.allclose(bounds, torch.tensor([2 * (1 + 0.75 / 0.4), 2 * (1 + 0.5), 2 * (1 + 2.5)]))
    assert torch.allclose(clipping.dpsgd_f_bounds(clipped, unclipped, 2.0, batch_size=10, rule="paper"), bounds)
    # no noisy clipped example, or an empty batch: every bound is C0
    assert torch.allclose(clipping.dpsgd_f_bounds(torch.zeros(3), torch.ones(3), 2.0, batch_size=3), torch.full((3,), 2.0))
    assert torch.allclose(clipping.dpsgd_f_bounds(clipped, unclipped, 2.0, batch_size=0), torch.full((3,), 2.0))
    # the authors' code: ratios (0.75, 0.2, 1), mean 0.65: C = 2 (1 + r_k / 0.65)
    mean_ratio = clipping.dpsgd_f_bounds(clipped, unclipped, 2.0, rule="mean_ratio")
    assert torch.allclose(mean_ratio, 2 * (1 + torch.tensor([0.75, 0.2, 1.0]) / 0.65), rtol=1e-6)
    with pytest.raises(ValueError, match="actual batch size"):
        clipping.dpsgd_f_bounds(clipped, unclipped, 2.0)
    with pytest.raises(ValueError, match="dpsgd_f_rule"):
        clipping.dpsgd_f_bounds(clipped, unclipped, 2.0, batch_size=10, rule="nope")


def test_dpsgd_f_bounds_noisy_total_rule_by_hand():
    # the earlier variant: m~ / b~ instead of m~ / |B|, an empty group gets ratio 0.
    # group 0: 3 clipped of 4; group 1: 1 clipped of 4; group 2: empty. m~ = 4, b~ = 8 -> overall rate 1/2
    clipped, unclipped = torch.tensor([3.0, 1.0, 0.0]), torch.tensor([1.0, 3.0, 0.0])
    bounds = clipping.dpsgd_f_bounds(clipped, unclipped, 2.0, rule="noisy_total")
    # C_k = C0 (1 + rate_k / (1/2)): 2 (1 + 1.5), 2 (1 + 0.5), 2 (1 + 0)
    assert torch.allclose(bounds, torch.tensor([5.0, 3.0, 2.0]))
    assert torch.allclose(clipping.dpsgd_f_bounds(torch.zeros(3), torch.ones(3), 2.0, rule="noisy_total"),
                          torch.full((3,), 2.0))
    norms, groups = torch.tensor([10.0, 1.0, 10.0]), torch.tensor([0, 0, 1])
    assert torch.allclose(clipping.dpsgd_f_factors(norms, groups, bounds), torch.tensor([0.5, 1.0, 0.3]))


def test_global_adapt_z_never_falls_below_c0():
    """No example above gamma Z and a noiseless count: log Z falls by eta_Z per step, but stops at C0."""
    model = nn.Linear(3, 1, bias=False)
    hooks = GradSampleHooks(model, loss_reduction="mean")
    c0 = 0.5
    opt = DPSGDGlobalAdaptOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=c0,
                                    expected_batch_size=4.0, z0=1.0, z_lr=0.5, z_threshold=1.0, count_noise_multiplier=1e-9)
    zs = []
    for _ in range(10):
        opt.zero_grad()
        model(torch.full((4, 3), 1e-3)).mean().backward()  # ||g_i|| ~ 1.7e-3, far below gamma Z
        opt.step()
        zs.append(opt.z)
        assert opt.last.factors.max() <= 1.0 + 1e-12  # f_i = C0 / max(||g_i||, Z) <= 1: nothing is scaled up
    assert min(zs) == pytest.approx(c0) and zs[0] == pytest.approx(math.exp(-0.5))
    assert opt.count_denominator == "actual" and opt.scalars()["frac_above_gamma_Z"] == 0.0
    # a floor below C0 only when asked for
    opt_low = DPSGDGlobalAdaptOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=c0,
                                        expected_batch_size=4.0, z0=1.0, z_min=0.1, count_noise_multiplier=1.0)
    assert opt_low.z_min == 0.1
    hooks.cleanup()


def test_next_z_by_hand():
    assert clipping.next_z(10.0, 0.3, 0.1) == pytest.approx(10.0 * math.exp(0.2))
    assert clipping.next_z(10.0, 0.0, 0.1, z_min=9.5) == 9.5
    assert clipping.next_z(10.0, 5.0, 0.1, z_max=20.0) == 20.0


@pytest.mark.parametrize("rule", ["dpsgd", "global", "global_adapt", "dpsgd_f"])
def test_clipped_norms_never_exceed_the_bound(rule):
    torch.manual_seed(0)
    grads = torch.randn(512, 37) * torch.logspace(-4, 3, 512)[:, None]  # norms from ~1e-3 to ~6e4
    grads[0] = 0.0
    norms = clipping.per_sample_norms([grads])
    groups = torch.randint(0, 4, (512,))
    if rule == "dpsgd":
        factors, bound = clipping.dpsgd_factors(norms, C0), C0
    elif rule == "global":
        factors, bound = clipping.global_factors(norms, C0, 50.0), C0
    elif rule == "global_adapt":
        factors, bound = clipping.global_adapt_factors(norms, C0, 50.0), C0
    else:
        m, o = clipping.group_clip_counts(norms, groups, C0, 4)
        bounds = clipping.dpsgd_f_bounds(m, o, C0, batch_size=len(norms))
        factors, bound = clipping.dpsgd_f_factors(norms, groups, bounds), float(bounds.max())
        assert ((factors[:, None] * grads).norm(dim=1) <= bounds[groups].float() * (1 + 1e-6)).all()
    clipped_norms = (factors[:, None] * grads).norm(dim=1)
    assert clipped_norms.max() <= bound * (1 + 1e-6)
    assert torch.isfinite(factors).all()
    if rule == "global_adapt":  # ||f_i g_i|| = C0 ||g_i|| / max(||g_i||, Z) exactly
        assert torch.allclose(clipped_norms, C0 * norms / norms.clamp(min=50.0), rtol=1e-5)


# -- the optimizers on a model whose per-example gradients are known ---------------------------------------------
def _step(optimizer_cls, x: torch.Tensor, groups: torch.Tensor | None = None, lr: float = 1.0, **kwargs):
    """Linear(d -> 1, no bias), loss = mean_i <w, x_i>: the per-example gradient of w is exactly x_i."""
    model = nn.Linear(x.shape[1], 1, bias=False)
    nn.init.zeros_(model.weight)
    hooks = GradSampleHooks(model, loss_reduction="mean")
    optimizer = optimizer_cls(torch.optim.SGD(model.parameters(), lr=lr), max_grad_norm=C0, **kwargs)
    optimizer.groups = groups
    optimizer.zero_grad()
    model(x).mean().backward()
    optimizer.step()
    hooks.cleanup()
    return model.weight.detach().flatten(), optimizer


def _examples() -> torch.Tensor:
    # norms 0.5, 2, 4 along different axes
    return torch.tensor([[0.5, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 4.0]])


def test_dpsgd_step_by_hand():
    x = _examples()
    w, opt = _step(PrivateOptimizer, x, noise_multiplier=0.0, expected_batch_size=4.0)
    # sum_i min(1, C0/||x_i||) x_i / n = (0.5, 1, 1) / 4, and SGD with lr 1 moves w by minus that
    assert torch.allclose(w, -torch.tensor([0.5, 1.0, 1.0]) / 4)
    assert opt.last.clipped.tolist() == [False, True, True]


def test_global_step_by_hand():
    w, opt = _step(DPSGDGlobalOptimizer, _examples(), noise_multiplier=0.0, expected_batch_size=2.0, z=3.0)
    # f = (1/3, 1/3, 0): (0.5/3, 2/3, 0) / 2
    assert torch.allclose(w, -torch.tensor([0.5 / 3, 2 / 3, 0.0]) / 2)


def test_global_adapt_step_and_z_update_by_hand():
    x = _examples()
    w, opt = _step(DPSGDGlobalAdaptOptimizer, x, noise_multiplier=0.0, expected_batch_size=2.0, z0=3.0, z_lr=0.1,
                   z_threshold=0.5, count_noise_multiplier=1e-9)
    # f = C0 / max(||x||, 3) = (1/3, 1/3, 1/4)
    assert torch.allclose(w, -torch.tensor([0.5 / 3, 2 / 3, 1.0]) / 2)
    # b = #{||x|| > 0.5 * 3} = 2, b~ = 2 / |B| = 2/3 (the paper's actual batch size): Z = 3 exp(-0.1 + 2/3)
    assert opt.z == pytest.approx(3.0 * math.exp(-0.1 + 2 / 3), rel=1e-6)
    assert opt.scalars()["frac_above_gamma_Z"] == pytest.approx(2 / 3)
    assert opt.last.clipped.tolist() == [False, False, True]  # the clip fraction counts ||g|| > Z, not > gamma Z
    # dividing by the expected batch size n = 2 instead: b~ = 1, Z = 3 exp(-0.1 + 1)
    _, opt = _step(DPSGDGlobalAdaptOptimizer, x, noise_multiplier=0.0, expected_batch_size=2.0, z0=3.0, z_lr=0.1,
                   z_threshold=0.5, count_noise_multiplier=1e-9, count_denominator="expected")
    assert opt.z == pytest.approx(3.0 * math.exp(0.9), rel=1e-6)


def test_dpsgd_f_step_by_hand():
    x = torch.tensor([[4.0, 0.0], [0.0, 0.5], [0.0, 3.0]])
    groups = torch.tensor([0, 0, 1])
    sigma_c = 0.3
    w, opt = _step(DPSGDFOptimizer, x, groups, noise_multiplier=0.0, expected_batch_size=3.0, num_groups=2,
                   count_noise_multiplier=sigma_c, generator=torch.Generator().manual_seed(7))
    # the count noise the optimizer drew: the first draw of its generator
    noise = torch.normal(0.0, sigma_c, size=(4,), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    counts = (torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64) + noise).floor().clamp(min=0)  # m_0 m_1 o_0 o_1
    # the paper's rule with the actual |B| = 3, by hand: r_k = m~_k / (m~_k + o~_k) (1 for an empty group)
    m, o = counts[:2], counts[2:]
    ratio = torch.where(m + o > 0, m / (m + o).clamp(min=1), torch.ones(2, dtype=torch.float64))
    bounds = C0 * (1 + ratio / (m.sum() / 3)) if m.sum() > 0 else torch.full((2,), C0, dtype=torch.float64)
    assert torch.allclose(opt.bounds, bounds)
    f = torch.minimum(torch.ones(3), bounds.float()[groups] / x.norm(dim=1))
    assert torch.allclose(w, -(f[:, None] * x).sum(0) / 3, atol=1e-6)


def test_dpsgd_f_without_groups_is_refused():
    with pytest.raises(ValueError, match="group labels"):
        _step(DPSGDFOptimizer, _examples(), None, noise_multiplier=0.0, expected_batch_size=3.0, num_groups=2,
              count_noise_multiplier=1.0)


# -- the noise -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,kwargs,sensitivity", [
    (PrivateOptimizer, {}, C0),
    (DPSGDGlobalAdaptOptimizer, {"z0": 50.0, "count_noise_multiplier": 10.0}, C0),
    (DPSGDGlobalOptimizer, {"z": 100.0}, C0),
])
def test_noise_on_zero_gradients_has_std_sigma_c0_over_n(cls, kwargs, sensitivity):
    """Zero per-example gradients: p.grad is the noise alone, std sigma * C0 / n after averaging."""
    torch.manual_seed(0)
    model = nn.Linear(200, 100, bias=False)
    hooks = GradSampleHooks(model, loss_reduction="mean")
    sigma, n = 1.3, 16.0
    optimizer = cls(torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=sigma, max_grad_norm=C0,
                    expected_batch_size=n, **kwargs)
    optimizer.zero_grad()
    model(torch.zeros(8, 200)).mean().backward()  # zero inputs: every per-example weight gradient is 0
    optimizer.step()
    hooks.cleanup()
    grad = model.weight.grad.flatten()
    assert abs(grad.mean()) < 4 * sigma * sensitivity / n / math.sqrt(grad.numel())
    assert grad.std().item() == pytest.approx(sigma * sensitivity / n, rel=0.03)  # 20,000 draws: ~0.5% error


def test_dpsgd_f_noise_scales_with_the_largest_bound():
    torch.manual_seed(0)
    model = nn.Linear(200, 100, bias=False)
    hooks = GradSampleHooks(model, loss_reduction="mean")
    optimizer = DPSGDFOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=1.0, max_grad_norm=C0,
                                expected_batch_size=10.0, num_groups=2, count_noise_multiplier=1.0)
    optimizer.groups = torch.zeros(8, dtype=torch.long)
    optimizer.zero_grad()
    model(torch.zeros(8, 200)).mean().backward()
    optimizer.step()
    hooks.cleanup()
    assert model.weight.grad.std().item() == pytest.approx(float(optimizer.bounds.max()) / 10.0, rel=0.03)


def test_dpsgd_f_noise_uses_the_largest_bound_when_examples_are_clipped():
    """Clipped gradients that cancel: 4 pairs of +v / -v in group 0 (norm 5 > C0, all clipped by the same factor)
    and one zero example in group 1. The clipped sum is 0, so p.grad is the noise alone, with std
    sigma * max_k C_k / n (not sigma * C0 / n). The bounds by hand from the paper's rule (as in
    test_dpsgd_f_step_by_hand); with these counts C_0 = C0 (1 + 1 / (8/9)) ~ 2.1 C0 and C_1 = C0."""
    torch.manual_seed(0)
    model = nn.Linear(200, 100, bias=False)
    hooks = GradSampleHooks(model, loss_reduction="mean")
    sigma, n, sigma_c = 1.0, 10.0, 0.3
    optimizer = DPSGDFOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=sigma, max_grad_norm=C0,
                                expected_batch_size=n, num_groups=2, count_noise_multiplier=sigma_c,
                                generator=torch.Generator().manual_seed(1))
    v = torch.full((200,), 50.0 / math.sqrt(200.0))  # per-example weight gradient (1/100) 1 v^T: norm 5
    x = torch.cat([v.expand(4, 200), -v.expand(4, 200), torch.zeros(1, 200)])
    optimizer.groups = torch.tensor([0] * 8 + [1])
    optimizer.zero_grad()
    model(x).mean().backward()
    optimizer.step()
    hooks.cleanup()
    noise = torch.normal(0.0, sigma_c, size=(4,), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    counts = (torch.tensor([8.0, 0.0, 0.0, 1.0], dtype=torch.float64) + noise).floor().clamp(min=0)  # m_0 m_1 o_0 o_1
    m, o = counts[:2], counts[2:]
    ratio = torch.where(m + o > 0, m / (m + o).clamp(min=1), torch.ones(2, dtype=torch.float64))
    bounds = C0 * (1 + ratio / (m.sum() / 9))
    assert torch.allclose(optimizer.bounds, bounds)
    assert bounds.max() > 1.5 * C0 and bounds.min() == C0  # the case tells the two noise formulas apart
    assert model.weight.grad.std().item() == pytest.approx(sigma * float(bounds.max()) / n, rel=0.03)


@pytest.mark.parametrize("kwargs,message", [({"max_grad_norm": 0.0}, "dp.max_grad_norm must be positive"),
                                            ({"max_grad_norm": -1.0}, "dp.max_grad_norm must be positive"),
                                            ({"noise_multiplier": -0.1}, "dp.noise_multiplier must be >= 0")])
def test_a_bound_of_zero_or_negative_noise_is_refused(kwargs, message):
    settings = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "expected_batch_size": 4.0} | kwargs
    with pytest.raises(ValueError, match=message):
        PrivateOptimizer(torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1), **settings)
    PrivateOptimizer(torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=1e-3,
                     expected_batch_size=4.0)  # the edges that are allowed: no noise, a tiny bound


def test_a_norm_exactly_at_the_bound_is_not_clipped():
    """'Clipped' means ||g_i|| > bound (strictly): C0 for DP-SGD, Z for DPSGD-Global."""
    x = torch.tensor([[1.0, 0.0], [0.0, 3.0]])  # norms exactly C0 = 1 and exactly Z = 3
    _, opt = _step(PrivateOptimizer, x, noise_multiplier=0.0, expected_batch_size=2.0)
    assert opt.last.clipped.tolist() == [False, True]
    _, opt = _step(DPSGDGlobalOptimizer, x, noise_multiplier=0.0, expected_batch_size=2.0, z=3.0)
    assert opt.last.clipped.tolist() == [False, False]
    _, opt = _step(DPSGDGlobalAdaptOptimizer, x, noise_multiplier=0.0, expected_batch_size=2.0, z0=3.0,
                   count_noise_multiplier=1.0)
    assert opt.last.clipped.tolist() == [False, False]


def test_an_empty_poisson_batch_releases_the_noise_alone():
    model = nn.Linear(300, 100, bias=False)
    hooks = GradSampleHooks(model, loss_reduction="sum")
    optimizer = PrivateOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=2.0, max_grad_norm=C0,
                                 expected_batch_size=4.0, generator=torch.Generator().manual_seed(0))
    optimizer.zero_grad()
    model(torch.zeros(0, 300)).sum().backward()
    optimizer.step()
    hooks.cleanup()
    assert optimizer.last.norms.numel() == 0
    assert model.weight.grad.std().item() == pytest.approx(2.0 * C0 / 4.0, rel=0.03)


def test_a_batch_of_one_is_clipped_like_any_other():
    w, opt = _step(PrivateOptimizer, torch.tensor([[0.0, 4.0]]), noise_multiplier=0.0, expected_batch_size=2.0)
    assert torch.allclose(w, -torch.tensor([0.0, 1.0]) / 2) and opt.last.clipped.tolist() == [True]


def test_bounds_equal_to_c0_and_one_group_are_allowed():
    x = _examples()
    w_global, _ = _step(DPSGDGlobalOptimizer, x, noise_multiplier=0.0, expected_batch_size=4.0, z=C0)
    assert torch.allclose(w_global, -torch.tensor([0.5, 0.0, 0.0]) / 4)  # Z = C0: the two above Z are dropped
    _, opt = _step(DPSGDGlobalAdaptOptimizer, x, noise_multiplier=0.0, expected_batch_size=4.0, z0=C0)
    assert opt.z >= C0
    _step(DPSGDFOptimizer, x, torch.zeros(3, dtype=torch.long), noise_multiplier=0.0, expected_batch_size=4.0,
          num_groups=1, count_noise_multiplier=1.0)
    with pytest.raises(ValueError, match="count"):
        _step(DPSGDFOptimizer, x, torch.zeros(3, dtype=torch.long), noise_multiplier=0.0, expected_batch_size=4.0,
              num_groups=2, count_noise_multiplier=0.0)
    with pytest.raises(ValueError):
        _step(DPSGDGlobalOptimizer, x, noise_multiplier=0.0, expected_batch_size=4.0, z=0.5 * C0)


@pytest.mark.parametrize("groups", [[-1, 0], [0, 2]])
def test_group_labels_outside_the_range_are_refused(groups):
    with pytest.raises(ValueError, match="group labels must be in"):
        clipping.group_clip_counts(torch.ones(2), torch.tensor(groups), C0, num_groups=2)


def test_dpsgd_f_bounds_with_a_single_clipped_example():
    # r = (1/1, 0/2), one clipped example in |B| = 3: C = C0 (1 + r / (1/3))
    bounds = clipping.dpsgd_f_bounds(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]), 2.0, batch_size=3)
    assert bounds.tolist() == pytest.approx([2.0 * 4, 2.0])
    # |B| = 1, its one example clipped: r = (1, 1 for the empty group), C = C0 (1 + 1 / 1)
    bounds = clipping.dpsgd_f_bounds(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]), 2.0, batch_size=1)
    assert bounds.tolist() == pytest.approx([4.0, 4.0])


def test_defaults_are_the_papers_hyperparameters():
    """../reference dp_fairness.md: Global-Adapt Z0 50, gamma 0.7, sigma_2 10 (MNIST); DPSGD-F sigma_c 8 (script)."""
    adapt = inspect.signature(DPSGDGlobalAdaptOptimizer.__init__).parameters
    assert (adapt["z0"].default, adapt["z_threshold"].default, adapt["count_noise_multiplier"].default) == (50.0, 0.7, 10.0)
    assert inspect.signature(DPSGDFOptimizer.__init__).parameters["count_noise_multiplier"].default == 8.0


def test_global_adapt_counts_norms_strictly_above_gamma_z():
    x = torch.tensor([[1.0, 0.0], [0.0, 3.0]])  # norms 1 = gamma Z exactly, and 3
    _, opt = _step(DPSGDGlobalAdaptOptimizer, x, noise_multiplier=0.0, expected_batch_size=2.0, z0=2.0,
                   z_threshold=0.5, z_lr=0.1, count_noise_multiplier=1e-9)
    assert opt.last_fraction_above_threshold == pytest.approx(0.5, abs=1e-6)


def test_global_adapt_on_a_batch_of_one():
    _, opt = _step(DPSGDGlobalAdaptOptimizer, torch.tensor([[0.0, 3.0]]), noise_multiplier=0.0, expected_batch_size=2.0,
                   z0=2.0, z_threshold=0.5, z_lr=0.1, count_noise_multiplier=1e-9)
    assert opt.last_fraction_above_threshold == pytest.approx(1.0)
    assert opt.z == pytest.approx(2.0 * math.exp(-0.1 + 1.0), rel=1e-6)  # b~ / |B| with the actual |B| = 1
