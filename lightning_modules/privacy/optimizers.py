"""The four methods as Opacus DPOptimizer subclasses; each differs only in its clip rule (and counts).

One step, for every method, on the Poisson batch B (over all ranks) with expected size n = qN:

    f_i             = clip_rule(||g_i||)                       (lightning_modules/privacy/clipping.py)
    g~              = (sum_{i in B} f_i g_i + N(0, sigma^2 S^2 I)) / n       S = sensitivity (C0, or max_k C_k)
    theta           <- wrapped_optimizer.step(theta, g~)

Dividing by the EXPECTED size n (not |B|) keeps |B| private. With several ranks each rank clips its part of B,
rank 0 alone adds the noise, and the sums are all-reduced: the noise on the global sum is N(0, sigma^2 S^2 I)
exactly once. Counts (DPSGD-F, Global-Adapt) are released the same way: local counts, noise on rank 0,
all-reduce, so every rank holds the same noisy count and the same bounds.

The per-sample gradients p.grad_sample come from Opacus's GradSampleHooks (attached by
callbacks/privacy.py); after each step `last` holds the norms, factors and clipped flags of this rank's
examples, for the fairness monitor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from opacus.optimizers import DPOptimizer
from torch import Tensor
from torch.optim import Optimizer

from lightning_modules.privacy import clipping
from lightning_modules.privacy.accounting import step_noise_multipliers


@dataclass
class StepStats:
    """This rank's examples of the last step: ||g_i||, f_i, whether i was clipped, and its group (or None)."""

    norms: Tensor
    factors: Tensor
    clipped: Tensor
    groups: Tensor | None


class PrivateOptimizer(DPOptimizer):
    """DP-SGD: f_i = min(1, C0 / ||g_i||), noise std sigma * C0 on the sum.

    Args:
        optimizer: the module's optimizer (SGD, Adam, ...); it receives the privatized gradient.
        noise_multiplier: sigma (for the gradient release).
        max_grad_norm: C0.
        expected_batch_size: n = qN, the GLOBAL expected batch size the noisy sum is divided by.
        count_accounting: "joint" or "separate", for methods that release counts (accounting.py).
        world_size, rank: the data-parallel group (1, 0 in a single process).
        generator: torch.Generator for the noise (None: torch's global generator).
    """

    method = "dpsgd"

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: float,
        count_accounting: str = "joint",
        world_size: int = 1,
        rank: int = 0,
        generator: torch.Generator | None = None,
    ) -> None:
        if max_grad_norm <= 0:
            raise ValueError(f"dp.max_grad_norm must be positive, got {max_grad_norm}")
        if noise_multiplier < 0:
            raise ValueError(f"dp.noise_multiplier must be >= 0, got {noise_multiplier}")
        super().__init__(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction="mean",
            generator=generator,
        )
        self.count_accounting = count_accounting
        self.world_size = world_size
        self.rank = rank
        self.groups: Tensor | None = None  # set before each step by the privacy callback (batch["group"])
        self.last: StepStats | None = None

    # -- what each method defines -----------------------------------------------------------------------------
    def clip_rule(self, norms: Tensor) -> tuple[Tensor, Tensor]:
        """(f_i, clipped_i): DP-SGD clips ||g_i|| > C0 to norm C0."""
        return clipping.dpsgd_factors(norms, self.max_grad_norm), norms > self.max_grad_norm

    def sensitivity(self) -> float:
        """S: the bound on ||f_i g_i||, which the gradient noise std sigma * S is calibrated to."""
        return self.max_grad_norm

    @property
    def count_noise_multiplier(self) -> float | None:
        """The noise multiplier of this method's count release (None: no counts released)."""
        return None

    def after_release(self) -> None:
        """State updates from released quantities after the step (Global-Adapt moves Z)."""

    def scalars(self) -> dict[str, float]:
        """Method state worth logging (e.g. Z)."""
        return {}

    # -- the shared pipeline ----------------------------------------------------------------------------------
    def step_noise_multipliers(self) -> list[float]:
        """What one step is charged with by the accountant (see accounting.py)."""
        return step_noise_multipliers(self.noise_multiplier, self.count_noise_multiplier, self.count_accounting)

    def _all_reduce(self, tensor: Tensor) -> Tensor:
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def release_count(self, local_counts: Tensor, noise_multiplier: float) -> Tensor:
        """sum over ranks of the local counts + N(0, sigma_c^2) per entry, drawn once (on rank 0)."""
        counts = local_counts.to(torch.float64).clone()
        if self.rank == 0:
            noise = torch.normal(0.0, noise_multiplier, size=counts.shape, generator=self.generator, dtype=torch.float64)
            counts += noise.to(counts.device)
        return self._all_reduce(counts)

    def clip_and_accumulate(self) -> None:
        """summed_grad_p = sum_i f_i g_{i,p} over this rank's examples, f from `clip_rule`."""
        grad_samples = self.grad_samples
        if len(grad_samples[0]) == 0:  # an empty Poisson batch: nothing to clip, the noise is still released
            norms = torch.zeros(0, device=grad_samples[0].device)
        else:
            norms = clipping.per_sample_norms(grad_samples)
        factors, clipped = self.clip_rule(norms)
        for p, g in zip(self.params, grad_samples):
            p.summed_grad = torch.einsum("i,i...->...", factors.to(device=g.device, dtype=p.dtype), g.to(p.dtype))
        self.last = StepStats(norms.detach(), factors.detach(), clipped.detach(), self.groups)

    def add_noise(self) -> None:
        """p.grad = sum over ranks of summed_grad + N(0, (sigma S)^2 I), the noise drawn once, on rank 0."""
        std = self.noise_multiplier * self.sensitivity()
        for p in self.params:
            grad = p.summed_grad
            if self.rank == 0 and std > 0:
                grad = grad + torch.normal(0.0, std, size=grad.shape, generator=self.generator, dtype=grad.dtype).to(grad.device)
            p.grad = self._all_reduce(grad).view_as(p)

    def scale_grad(self) -> None:
        """g~ = noisy sum / n, n = the global expected batch size."""
        for p in self.params:
            p.grad /= self.expected_batch_size

    def pre_step(self, closure=None) -> bool:
        self.clip_and_accumulate()
        self.add_noise()
        self.scale_grad()
        if self.step_hook:
            self.step_hook(self)  # accounting
        self.after_release()
        return True


class DPSGDFOptimizer(PrivateOptimizer):
    """DPSGD-F: per-group bounds C_k from noisy clip counts (clipping.dpsgd_f_bounds), noise std sigma * max_k C_k.

    Needs each example's group a_i (`self.groups`, from batch["group"]) in [0, num_groups). `bound_rule`:
    "paper" (Alg. 4: C_k = C0 (1 + (m~_k / b~_k) / (m~ / |B|)), |B| the actual batch size over all ranks),
    "noisy_total" (m~ / b~ instead of m~ / |B|) or "mean_ratio" (the authors' code); see clipping.dpsgd_f_bounds.
    """

    method = "dpsgd_f"

    def __init__(self, optimizer: Optimizer, *, num_groups: int, count_noise_multiplier: float = 8.0,
                 bound_rule: str = "paper", **kwargs) -> None:
        super().__init__(optimizer, **kwargs)
        if bound_rule not in clipping.DPSGD_F_RULES:
            raise ValueError(f"dp.dpsgd_f_rule={bound_rule!r}; choose one of {clipping.DPSGD_F_RULES}")
        self.bound_rule = bound_rule
        if not num_groups or num_groups < 1:
            raise ValueError("dpsgd_f needs dp.num_groups (the number of groups, e.g. 10 for digit classes)")
        if count_noise_multiplier <= 0:
            raise ValueError(f"dp.count_noise_multiplier must be positive, got {count_noise_multiplier}")
        self.num_groups = num_groups
        self._count_sigma = count_noise_multiplier
        self.bounds = torch.full((num_groups,), float(self.max_grad_norm), dtype=torch.float64)

    @property
    def count_noise_multiplier(self) -> float:
        return self._count_sigma

    def clip_rule(self, norms: Tensor) -> tuple[Tensor, Tensor]:
        if self.groups is None:
            raise ValueError("dpsgd_f needs group labels: the training batch has no 'group' entry (dp.group_key)")
        groups = self.groups.to(norms.device).long()
        if len(groups) != len(norms):
            raise ValueError(f"{len(groups)} group labels for {len(norms)} per-sample gradients")
        m, o = clipping.group_clip_counts(norms, groups, self.max_grad_norm, self.num_groups)
        noisy = self.release_count(torch.cat([m, o]), self._count_sigma).floor().clamp(min=0)
        batch_size = float(self._all_reduce(torch.tensor([float(len(norms))], dtype=torch.float64)))
        self.bounds = clipping.dpsgd_f_bounds(noisy[: self.num_groups], noisy[self.num_groups :], self.max_grad_norm,
                                              batch_size=batch_size, rule=self.bound_rule)
        factors = clipping.dpsgd_f_factors(norms, groups, self.bounds.to(norms.device))
        return factors, norms > self.bounds.to(norms.device, norms.dtype)[groups]

    def sensitivity(self) -> float:
        return float(self.bounds.max())

    def scalars(self) -> dict[str, float]:
        return {"bound_max": float(self.bounds.max())}


class DPSGDGlobalOptimizer(PrivateOptimizer):
    """DPSGD-Global: f_i = C0 / Z for ||g_i|| <= Z, else 0 (dropped); Z >= C0 fixed."""

    method = "dpsgd_global"

    def __init__(self, optimizer: Optimizer, *, z: float = 100.0, **kwargs) -> None:
        super().__init__(optimizer, **kwargs)
        if z < self.max_grad_norm:
            raise ValueError(f"dpsgd_global needs dp.z >= dp.max_grad_norm, got Z={z}, C0={self.max_grad_norm}")
        self.z = z

    def clip_rule(self, norms: Tensor) -> tuple[Tensor, Tensor]:
        return clipping.global_factors(norms, self.max_grad_norm, self.z), norms > self.z

    def scalars(self) -> dict[str, float]:
        return {"Z": self.z}


class DPSGDGlobalAdaptOptimizer(PrivateOptimizer):
    """DPSGD-Global-Adapt: f_i = C0 / max(||g_i||, Z); after each step Z <- Z exp(-eta_Z + b~).

    b~ = (#{i in B: ||g_i|| > gamma Z} + N(0, sigma2^2)) / d, with d the actual |B| (count_denominator="actual",
    the paper's Alg. 2 and code; the default) or the expected batch size n ("expected", which keeps |B| private:
    dividing by the actual |B| releases it, a leak the paper and Opacus's adaptive clipping ignore).

    Z never goes below C0 unless z_min says otherwise (the paper requires Z >= C0; below it f_i > 1 would scale
    small gradients up). `last_fraction_above_threshold` is the (noise-free) fraction #{||g_i|| > gamma Z} / |B|
    of the last step, distinct from the clip fraction #{||g_i|| > Z} / |B| (StepStats.clipped).

    Args:
        z0: initial Z (>= C0). z_lr: eta_Z (also the long-run fraction above gamma Z). z_threshold: gamma.
        count_noise_multiplier: sigma2. z_min: floor of Z (None: C0; set lower only deliberately). z_max: cap.
    """

    method = "dpsgd_global_adapt"

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        z0: float = 50.0,
        z_lr: float = 0.1,
        z_threshold: float = 0.7,
        count_noise_multiplier: float = 10.0,
        z_min: float | None = None,
        z_max: float | None = None,
        count_denominator: str = "actual",
        **kwargs,
    ) -> None:
        super().__init__(optimizer, **kwargs)
        if z0 < self.max_grad_norm:
            raise ValueError(f"dpsgd_global_adapt needs dp.z0 >= dp.max_grad_norm, got Z0={z0}, C0={self.max_grad_norm}")
        if count_noise_multiplier <= 0:
            raise ValueError(f"dp.count_noise_multiplier must be positive, got {count_noise_multiplier}")
        if count_denominator not in ("expected", "actual"):
            raise ValueError(f"dp.count_denominator={count_denominator!r}; choose expected or actual")
        self.z = z0
        self.z_lr = z_lr
        self.z_threshold = z_threshold
        self._count_sigma = count_noise_multiplier
        self.z_min = self.max_grad_norm if z_min is None else z_min
        self.z_max = z_max
        if self.z_max is not None and self.z_max < self.z_min:
            raise ValueError(f"dp.z_max={z_max} is below the floor of Z ({self.z_min})")
        self.count_denominator = count_denominator
        self.last_fraction_above_threshold = float("nan")

    @property
    def count_noise_multiplier(self) -> float:
        return self._count_sigma

    def clip_rule(self, norms: Tensor) -> tuple[Tensor, Tensor]:
        return clipping.global_adapt_factors(norms, self.max_grad_norm, self.z), norms > self.z

    def after_release(self) -> None:
        assert self.last is not None
        norms = self.last.norms
        above = (norms > self.z_threshold * self.z).sum().to(torch.float64).reshape(1)
        batch_size = float(self._all_reduce(torch.tensor([float(len(norms))], dtype=torch.float64)))
        self.last_fraction_above_threshold = float(self._all_reduce(above.clone())) / max(batch_size, 1.0)
        noisy_count = float(self.release_count(above, self._count_sigma))
        denominator = self.expected_batch_size if self.count_denominator == "expected" else max(batch_size, 1.0)
        self.z = clipping.next_z(self.z, noisy_count / denominator, self.z_lr, self.z_min, self.z_max)

    def scalars(self) -> dict[str, float]:
        """Z and the fraction of the last batch above gamma Z (what drives Z; the clip fraction is above Z)."""
        return {"Z": self.z, "frac_above_gamma_Z": self.last_fraction_above_threshold}


METHODS: dict[str, type[PrivateOptimizer]] = {
    cls.method: cls for cls in (PrivateOptimizer, DPSGDFOptimizer, DPSGDGlobalOptimizer, DPSGDGlobalAdaptOptimizer)
}
