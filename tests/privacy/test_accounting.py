"""Epsilon against an independent computation, the count releases' accounting, calibration and the budget."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from opacus.grad_sample import GradSampleHooks
from scipy.special import logsumexp
from torch import nn

from lightning_modules.privacy.accounting import (
    PrivacyLedger,
    calibrate_noise_multiplier,
    compute_epsilon,
    joint_noise_multiplier,
    max_steps_within_budget,
)
from lightning_modules.privacy.optimizers import DPSGDGlobalAdaptOptimizer

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook")
ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


@functools.lru_cache
def sgm_rdp(q: float, sigma: float) -> np.ndarray:
    """RDP of one sampled Gaussian mechanism at every order a of ORDERS, by numerical integration
    (Mironov et al. 2019):

    D_a = log(integral mu0(z) (mu(z) / mu0(z))^a dz) / (a - 1),
    mu0 = N(0, sigma^2), mu = (1 - q) mu0 + q N(1, sigma^2),  mu / mu0 = 1 - q + q exp((2z - 1) / (2 sigma^2)).
    The integrand is smooth and vanishes at both ends of the grid, so a Riemann sum is accurate to ~1e-10.
    """
    a = np.array(ORDERS)[:, None]
    z = np.linspace(-30 * sigma - 1, max(ORDERS) + 30 * sigma + 1, 40_001)[None, :]
    log_mu0 = -(z**2) / (2 * sigma**2) - math.log(sigma * math.sqrt(2 * math.pi))
    log_ratio = np.logaddexp(math.log1p(-q), math.log(q) + (2 * z - 1) / (2 * sigma**2))
    log_integral = logsumexp(log_mu0 + a * log_ratio, axis=1) + math.log(z[0, 1] - z[0, 0])
    return log_integral / (a[:, 0] - 1)


def epsilon_from_rdp(rdp: np.ndarray, delta: float) -> float:
    """Balle et al. 2020 (Thm 21): eps = min_a rdp_a + log((a - 1) / a) - (log delta + log a) / (a - 1)."""
    a = np.array(ORDERS)
    return float(np.min(rdp + np.log((a - 1) / a) - (math.log(delta) + np.log(a)) / (a - 1)))


def independent_epsilon(releases: list[tuple[float, float, int]], delta: float) -> float:
    rdp = sum(sgm_rdp(q, sigma) * steps for q, sigma, steps in releases)
    return epsilon_from_rdp(rdp, delta)


@pytest.mark.parametrize("q,sigma,steps,delta", [(0.01, 1.0, 1000, 1e-5), (128 / 983, 1.3, 154, 1e-5)])
def test_epsilon_matches_an_independent_computation(q, sigma, steps, delta):
    ours = compute_epsilon({sigma: steps}, q, delta, "rdp")
    assert ours == pytest.approx(independent_epsilon([(q, sigma, steps)], delta), abs=1e-3)


def test_paper_mnist_epsilon():
    # the reference notes: q = 1/214, sigma = 0.8, 12,840 steps, delta = 1e-6 -> 5.90 (the paper's DPSGD epsilon)
    assert compute_epsilon({0.8: 12_840}, 1 / 214, 1e-6, "rdp") == pytest.approx(5.90, abs=0.01)


def test_prv_accountant_is_close_and_tighter():
    rdp, prv = (compute_epsilon({1.3: 154}, 0.13, 1e-5, acc) for acc in ("rdp", "prv"))
    assert prv < rdp and prv == pytest.approx(rdp, rel=0.25)


def _global_adapt_steps(count_accounting: str, steps: int, sigma: float, sigma2: float) -> PrivacyLedger:
    """Real Global-Adapt optimizer steps; the ledger records through the optimizer's step hook."""
    ledger = PrivacyLedger(sample_rate=0.05, delta=1e-5)
    model = nn.Linear(4, 1)
    hooks = GradSampleHooks(model, loss_reduction="mean")
    opt = DPSGDGlobalAdaptOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=sigma, max_grad_norm=1.0,
                                    expected_batch_size=8.0, count_noise_multiplier=sigma2, count_accounting=count_accounting)
    opt.attach_step_hook(lambda o: ledger.record(o.step_noise_multipliers()))
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(8, 4)).mean().backward()
        opt.step()
    hooks.cleanup()
    return ledger


def test_global_adapt_count_release_is_accounted_jointly():
    sigma, sigma2 = 1.0, 2.0  # a noisy-ish count, so its cost is visible
    ledger = _global_adapt_steps("joint", 5, sigma, sigma2)
    sigma_eff = (sigma**-2 + sigma2**-2) ** -0.5
    [(charged, count)] = ledger.steps.items()
    assert charged == pytest.approx(sigma_eff) and count == 5
    expected = independent_epsilon([(0.05, sigma_eff, 5)], 1e-5)
    assert ledger.epsilon() == pytest.approx(expected, abs=1e-3)
    assert ledger.epsilon() > compute_epsilon({sigma: 5}, 0.05, 1e-5)  # the count costs something


def test_global_adapt_count_release_accounted_separately():
    ledger = _global_adapt_steps("separate", 5, 1.0, 2.0)
    assert ledger.steps == {1.0: 5, 2.0: 5}
    expected = independent_epsilon([(0.05, 1.0, 5), (0.05, 2.0, 5)], 1e-5)
    assert ledger.epsilon() == pytest.approx(expected, abs=1e-3)


def test_joint_noise_multiplier():
    assert joint_noise_multiplier(3.0, 4.0) == pytest.approx(1 / math.sqrt(1 / 9 + 1 / 16))
    assert joint_noise_multiplier(0.8, 10.0) == pytest.approx(0.797, abs=1e-3)  # the reference notes' MNIST value


def test_calibration_spends_the_target():
    q, steps = 0.1, 200
    sigma = calibrate_noise_multiplier(4.0, 1e-5, q, steps)
    assert compute_epsilon({sigma: steps}, q, 1e-5) <= 4.0
    assert compute_epsilon({sigma * 0.99: steps}, q, 1e-5) > 4.0
    # with a count release charged jointly, the gradient noise must be larger for the same budget
    sigma_joint = calibrate_noise_multiplier(4.0, 1e-5, q, steps, per_step=lambda s: [joint_noise_multiplier(s, 10.0)])
    assert sigma_joint > sigma


def test_budget_is_the_last_affordable_step():
    ledger = PrivacyLedger(sample_rate=0.1, delta=1e-5)
    ledger.record([1.0])
    allowed = max_steps_within_budget(ledger, [1.0], 3.0)
    assert ledger.epsilon(allowed, [1.0]) <= 3.0 < ledger.epsilon(allowed + 1, [1.0])
    # the same boundary from the independent RDP computation (the recorded step plus `allowed` more), so an
    # off-by-one in the ledger, which the search would share, fails too; one step moves epsilon by ~0.03 >> 1e-3
    assert independent_epsilon([(0.1, 1.0, 1 + allowed)], 1e-5) <= 3.0 + 1e-3
    assert independent_epsilon([(0.1, 1.0, 2 + allowed)], 1e-5) > 3.0 - 1e-3
    state = ledger.state_dict()
    restored = PrivacyLedger(sample_rate=0.1, delta=1e-5)
    restored.load_state_dict(state)
    assert restored.epsilon() == ledger.epsilon()
    with pytest.raises(ValueError, match="sampling rate"):
        PrivacyLedger(sample_rate=0.2, delta=1e-5).load_state_dict(state)


# -- a second, closed-form cross-check: integer orders (Mironov, Talwar, Zhang 2019, Sec. 3.3) ---------------------
INTEGER_ORDERS = list(range(2, 64))


def sgm_rdp_integer(q: float, sigma: float, alpha: int) -> float:
    """RDP at an integer order alpha of the Poisson-subsampled Gaussian (sensitivity 1, noise sigma):

    A_alpha = sum_{k=0}^{alpha} C(alpha, k) (1 - q)^(alpha - k) q^k exp((k^2 - k) / (2 sigma^2)),
    RDP(alpha) = log(A_alpha) / (alpha - 1). Exact (a finite sum), evaluated in log space.
    """
    log_terms = [math.lgamma(alpha + 1) - math.lgamma(k + 1) - math.lgamma(alpha - k + 1)
                 + (alpha - k) * math.log1p(-q) + (k * math.log(q) if k else 0.0) + (k * k - k) / (2 * sigma**2)
                 for k in range(alpha + 1)]
    return float(logsumexp(log_terms)) / (alpha - 1)


def epsilon_integer_orders(q: float, sigma: float, steps: int, delta: float) -> float:
    """The RDP -> (eps, delta) conversion (Balle et al. 2020, Thm 21), minimised over the integer orders alone."""
    return min(steps * sgm_rdp_integer(q, sigma, a) + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1)
               for a in INTEGER_ORDERS)


@pytest.mark.parametrize("q,sigma", [(0.01, 1.0), (0.1, 0.8), (128 / 983, 1.3), (1 / 214, 0.8)])
def test_integer_order_rdp_matches_the_numerical_integral(q, sigma):
    integral = dict(zip(ORDERS, sgm_rdp(q, sigma)))
    for a in (2, 5, 12, 32):
        assert sgm_rdp_integer(q, sigma, a) == pytest.approx(integral[a], rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("q,sigma,steps,delta", [(0.01, 1.0, 1000, 1e-5), (1 / 214, 0.8, 12_840, 1e-6),
                                                  (128 / 983, 1.3, 154, 1e-5), (64 / 995, 0.8, 800, 1e-5)])
def test_opacus_epsilon_matches_the_closed_form_integer_order_bound(q, sigma, steps, delta):
    """Opacus's RDP accountant restricted to integer orders reproduces the closed form to 1e-6; over its full
    order grid (fractional orders too) it can only be lower: within 0.02 at epsilon ~ 2-6, a few percent at ~ 8
    (where the best order falls between two integers)."""
    from opacus.accountants import RDPAccountant

    ours = epsilon_integer_orders(q, sigma, steps, delta)
    acc = RDPAccountant()
    acc.history = [(sigma, q, steps)]
    opacus_integer, _ = acc.get_privacy_spent(delta=delta, alphas=INTEGER_ORDERS)
    assert opacus_integer == pytest.approx(ours, rel=1e-6)
    full = compute_epsilon({sigma: steps}, q, delta, "rdp")
    assert full <= ours + 1e-9 and ours - full < 0.02 + 0.03 * ours


@pytest.mark.filterwarnings("ignore:GDP accounting is experimental")
def test_other_opacus_accountants_are_offered():
    rdp, prv, gdp = (compute_epsilon({1.0: 1000}, 0.01, 1e-5, acc) for acc in ("rdp", "prv", "gdp"))
    assert prv < rdp and prv == pytest.approx(rdp, rel=0.25)  # PRV: numerical, tighter than RDP
    assert gdp == pytest.approx(prv, rel=0.25)                # GDP: CLT approximation of the same curve
    with pytest.raises(ValueError, match="accountant"):
        compute_epsilon({1.0: 10}, 0.01, 1e-5, "moments")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_pld_accountant_is_tight_and_agrees_with_prv():
    """Two independent numerical accountants (Google's PLD, Opacus's PRV) of the same composition agree to
    0.5%, both below RDP's upper bound; heterogeneous steps compose (sigma 1 then 2: between the two extremes)."""
    steps, q, delta = {1.0: 400}, 64 / 995, 1e-5  # experiment=dp_digits_unbalanced: RDP 9.75
    rdp, prv, pld = (compute_epsilon(steps, q, delta, acc) for acc in ("rdp", "prv", "pld"))
    assert pld < 0.95 * rdp and pld == pytest.approx(prv, rel=0.005)
    mixed = compute_epsilon({1.0: 300, 2.0: 100}, q, delta, "pld")
    assert compute_epsilon({2.0: 400}, q, delta, "pld") < mixed < compute_epsilon({1.0: 400}, q, delta, "pld")
    assert mixed == pytest.approx(compute_epsilon({1.0: 300, 2.0: 100}, q, delta, "prv"), rel=0.005)


def test_budget_search_at_its_edges():
    ledger = PrivacyLedger(sample_rate=0.05, delta=1e-5)
    one_step = ledger.epsilon(1, [1.0])
    assert max_steps_within_budget(ledger, [1.0], one_step) == 1  # spending exactly the target is allowed
    assert max_steps_within_budget(ledger, [1.0], 0.99 * one_step) == 0
    assert max_steps_within_budget(ledger, [1.0], 1e6, limit=4) == 4  # the cap itself is reachable
    assert max_steps_within_budget(ledger, [1.0], ledger.epsilon(100, [1.0])) == 100  # the default cap is far
    # a target spent exactly by a power of two steps (a top of the doubling bracket) affords those steps
    assert max_steps_within_budget(ledger, [1.0], ledger.epsilon(4, [1.0])) == 4
    # a budget no run can spend stops at the default cap, 10**7 steps (epsilon at 1.7e7 steps is still ~0.8)
    assert max_steps_within_budget(ledger, [1000.0], 10.0) == 10**7
    three = ledger.epsilon(3, [1.0])
    assert max_steps_within_budget(ledger, [1.0], three, limit=4) == 3  # a cap that is not affordable is not returned
    assert max_steps_within_budget(ledger, [1.0], three, limit=3) == 3
    with pytest.raises(ValueError, match="must be positive"):
        joint_noise_multiplier(1.0, 0.0)
    for delta in (0.0, 1.0):
        with pytest.raises(ValueError, match="dp.delta"):
            PrivacyLedger(sample_rate=0.05, delta=delta)


def test_calibration_below_one_is_the_smallest_sigma_to_rel_tol():
    """A loose target needs sigma < 1: the search must start its bracket at 0, and stop within rel_tol."""
    q, steps, delta, target = 0.05, 10, 1e-5, 30.0
    sigma = calibrate_noise_multiplier(target, delta, q, steps)
    assert sigma < 1
    assert compute_epsilon({sigma: steps}, q, delta) <= target < compute_epsilon({sigma * (1 - 1e-3): steps}, q, delta)
    # a target of epsilon <= 1 (a common strict budget) is positive too
    strict = calibrate_noise_multiplier(1.0, delta, q, steps)
    assert compute_epsilon({strict: steps}, q, delta) <= 1.0 < compute_epsilon({strict * (1 - 1e-3): steps}, q, delta)
    with pytest.raises(ValueError, match="target_epsilon must be positive"):
        calibrate_noise_multiplier(0.0, 1e-5, 0.05, 10)
    # the search gives up past sigma = 1e4 (GDP, whose epsilon keeps falling with sigma, to reach there cheaply):
    # a target that needs sigma 6000 is found, one that needs 12000 is refused
    with pytest.warns(UserWarning, match="GDP"):
        reachable = compute_epsilon({6000.0: 1000}, q, delta, "gdp")
        assert calibrate_noise_multiplier(reachable, delta, q, 1000, "gdp") == pytest.approx(6000.0, rel=1e-3)
        with pytest.raises(ValueError, match="cannot be reached"):
            calibrate_noise_multiplier(compute_epsilon({12000.0: 1000}, q, delta, "gdp"), delta, q, 1000, "gdp")


def test_a_ledger_counts_steps_and_starts_at_zero():
    ledger = PrivacyLedger(sample_rate=0.05, delta=1e-5)
    assert ledger.epsilon() == 0.0 and compute_epsilon({1.0: 0}, 0.05, 1e-5) == 0.0
    ledger.record([1.0, 10.0])  # one step releasing two mechanisms
    ledger.record([1.0, 10.0])
    assert ledger.num_steps == 2 and ledger.steps == {1.0: 2, 10.0: 2}
    assert ledger.epsilon() == compute_epsilon({1.0: 2, 10.0: 2}, 0.05, 1e-5)
    # a look-ahead adds its steps to the recorded ones, and counts a noise multiplier not recorded yet from 0
    assert ledger.epsilon(3, [1.0, 20.0]) == compute_epsilon({1.0: 5, 10.0: 2, 20.0: 3}, 0.05, 1e-5)
    assert PrivacyLedger(0.05, 1e-5).epsilon(3, [1.0]) == compute_epsilon({1.0: 3}, 0.05, 1e-5)
