"""Privacy accounting for the four methods, on Opacus's accountants (RDP, PRV, GDP) or Google's PLD accountant.

Every training step releases, on one Poisson batch of rate q, Gaussian mechanisms described by their noise
multiplier (noise std / L2 sensitivity):

- DP-SGD, DPSGD-Global: the clipped gradient sum, multiplier sigma;
- DPSGD-F: the gradient sum (sigma) and the per-group clip counts (sigma_c, sensitivity 1);
- DPSGD-Global-Adapt: the gradient sum (sigma1) and the count b = #{i: ||g_i|| > gamma Z} (sigma2, sensitivity 1).

The count is computed on the SAME batch as the gradient, so `count_accounting` says how the pair is charged:

- "joint" (default): the pair is one Gaussian mechanism on the concatenated vector (sum / sigma C, count / sigma_c):
  an example moves it by at most sqrt(sigma^-2 + sigma_c^-2) noise standard deviations, so the step is ONE
  sampled Gaussian mechanism with  sigma_eff = (sigma^-2 + sigma_c^-2)^(-1/2).  The bound also holds when the
  gradient's bound depends on the released counts (DPSGD-F): adaptively composed Gaussians are dominated by
  the joint Gaussian. This is the rigorous choice for two releases that share one Poisson batch.
- "separate": two sampled Gaussian steps per iteration, (sigma, q) and (sigma_c, q), as the paper's code does.
  The subsampling analysis behind it assumes independently drawn batches, which is not the case here; it is
  kept to reproduce the paper's epsilon.

Composition over steps does not depend on the order of releases, so the ledger only counts steps per noise
multiplier; epsilon is recomputed from those counts by a fresh accountant:

- "rdp" (default): Renyi DP of the sampled Gaussian, converted to (epsilon, delta); an upper bound, loose by ~10%;
- "prv" and "pld": numerical accountants (Opacus's privacy random variables; the privacy loss distribution of
  Google's `dp_accounting`, pessimistic discretisation), tight to ~0.1% and agreeing with each other; PLD costs
  ~1 s per epsilon (every logged step and each step of a budget search);
- "gdp": Opacus's CLT approximation, which can UNDERestimate epsilon.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

from opacus.accountants import create_accountant

ACCOUNTANTS = ("rdp", "prv", "pld", "gdp")
COUNT_ACCOUNTING = ("joint", "separate")


def joint_noise_multiplier(*noise_multipliers: float) -> float:
    """sigma_eff = (sum_j sigma_j^-2)^(-1/2): Gaussian releases of one batch charged as one mechanism."""
    if any(s <= 0 for s in noise_multipliers):
        raise ValueError(f"noise multipliers must be positive, got {noise_multipliers}")
    return sum(s**-2 for s in noise_multipliers) ** -0.5


def step_noise_multipliers(noise_multiplier: float, count_noise_multiplier: float | None, count_accounting: str) -> list[float]:
    """The noise multipliers one training step is charged with (see the module docstring)."""
    if count_accounting not in COUNT_ACCOUNTING:
        raise ValueError(f"dp.count_accounting={count_accounting!r}; choose one of {COUNT_ACCOUNTING}")
    if count_noise_multiplier is None:
        return [noise_multiplier]
    if count_accounting == "joint":
        if noise_multiplier == 0:  # a noiseless gradient: no guarantee (epsilon = inf), e.g. a clipping-only ablation
            return [0.0]
        return [joint_noise_multiplier(noise_multiplier, count_noise_multiplier)]
    return [noise_multiplier, count_noise_multiplier]


def compute_epsilon(steps: Mapping[float, int], sample_rate: float, delta: float, accountant: str = "rdp") -> float:
    """epsilon(delta) of the composition of `steps[sigma]` sampled Gaussian mechanisms (rate q) per sigma."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"dp.accountant={accountant!r}; choose one of {ACCOUNTANTS}")
    history = [(float(sigma), float(sample_rate), int(n)) for sigma, n in sorted(steps.items()) if n > 0]
    if not history:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in history):
        return math.inf  # a release without noise
    if accountant == "pld":
        return _pld_epsilon(history, delta)
    acc = create_accountant(mechanism=accountant)
    acc.history = history
    return float(acc.get_epsilon(delta=delta))


def _pld_epsilon(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """epsilon(delta) of the composition by the PLD accountant (add-or-remove-one neighbours, as Opacus)."""
    import dp_accounting  # imported here: only this accountant needs it
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

    event = dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), n)
        for sigma, q, n in history])
    return float(PLDAccountant().compose(event).get_epsilon(delta))


class PrivacyLedger:
    """Counts the releases made so far and turns them into epsilon.

    Args:
        sample_rate: Poisson sampling rate q = expected batch size / dataset size.
        delta: the delta of the reported (epsilon, delta).
        accountant: one of ACCOUNTANTS (see the module docstring).
    """

    def __init__(self, sample_rate: float, delta: float, accountant: str = "rdp") -> None:
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample rate must be in (0, 1], got {sample_rate}")
        if not 0 < delta < 1:
            raise ValueError(f"dp.delta must be in (0, 1), got {delta}")
        self.sample_rate = sample_rate
        self.delta = delta
        self.accountant = accountant
        self.steps: dict[float, int] = {}
        self.num_steps = 0  # training steps recorded

    def record(self, noise_multipliers: Sequence[float]) -> None:
        """One training step: one sampled Gaussian release per noise multiplier."""
        self.num_steps += 1
        for sigma in noise_multipliers:
            self.steps[float(sigma)] = self.steps.get(float(sigma), 0) + 1

    def epsilon(self, extra_steps: int = 0, per_step: Sequence[float] = ()) -> float:
        """epsilon spent so far, or after `extra_steps` more steps that each release `per_step`."""
        steps = dict(self.steps)
        for sigma in per_step:
            steps[float(sigma)] = steps.get(float(sigma), 0) + extra_steps
        return compute_epsilon(steps, self.sample_rate, self.delta, self.accountant)

    def state_dict(self) -> dict:
        return {"sample_rate": self.sample_rate, "delta": self.delta, "accountant": self.accountant,
                "num_steps": self.num_steps, "steps": [[sigma, n] for sigma, n in self.steps.items()]}

    def load_state_dict(self, state: dict) -> None:
        if state["sample_rate"] != self.sample_rate or state["accountant"] != self.accountant:
            raise ValueError(
                f"resuming a private run with a different sampling rate or accountant (checkpoint: q={state['sample_rate']}, "
                f"{state['accountant']}; now: q={self.sample_rate}, {self.accountant}): epsilon would be wrong"
            )
        self.steps = {float(sigma): int(n) for sigma, n in state["steps"]}
        self.num_steps = int(state["num_steps"])


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    per_step: Callable[[float], list[float]] = lambda sigma: [sigma],
    rel_tol: float = 1e-3,
) -> float:
    """The smallest sigma (to rel_tol) with epsilon(steps releases of per_step(sigma) each) <= target_epsilon."""
    if target_epsilon <= 0:
        raise ValueError(f"dp.target_epsilon must be positive, got {target_epsilon}")

    def eps(sigma: float) -> float:
        return compute_epsilon({s: steps for s in per_step(sigma)}, sample_rate, delta, accountant)

    lo, hi = 0.0, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, 2 * hi
        if hi > 1e4:
            raise ValueError(
                f"dp.target_epsilon={target_epsilon} cannot be reached in {steps} steps at q={sample_rate:.4g} "
                "(for dpsgd_f / global_adapt with joint accounting the count noise alone may exceed it: raise "
                "dp.count_noise_multiplier or the target)"
            )
    while hi - lo > rel_tol * hi:
        mid = (lo + hi) / 2
        if mid > 0 and eps(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi


def max_steps_within_budget(
    ledger: PrivacyLedger, per_step: Sequence[float], target_epsilon: float, limit: int = 10**7
) -> int:
    """The most further steps (each releasing `per_step`) after which epsilon is still <= target_epsilon."""
    if ledger.epsilon(1, per_step) > target_epsilon:
        return 0
    lo, hi = 1, 2
    while hi < limit and ledger.epsilon(hi, per_step) <= target_epsilon:
        lo, hi = hi, 2 * hi
    if hi >= limit:  # the doubling reached the cap: it is the answer only if it is affordable itself
        if ledger.epsilon(limit, per_step) <= target_epsilon:
            return limit
        hi = limit
    while hi - lo > 1:  # eps(lo) <= target < eps(hi)
        mid = (lo + hi) // 2
        if ledger.epsilon(mid, per_step) <= target_epsilon:
            lo = mid
        else:
            hi = mid
    return lo

