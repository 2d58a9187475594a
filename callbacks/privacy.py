"""Make any LightningModule differentially private by config: `dp=dpsgd | dpsgd_f | dpsgd_global | dpsgd_global_adapt`.

What the callback does, without touching the module's code:

- setup (fit): refuses what cannot be private (BatchNorm and other layers Opacus cannot privatize, FSDP /
  DeepSpeed, gradient accumulation, Lightning gradient clipping, mixed precision, manual optimisation, a
  non-Poisson loader); replaces the datamodule's (or module's) `train_dataloader` hook by one that returns a
  Poisson-sampled loader over the same dataset (lightning_modules/privacy/sampling.py): rate q = n / N with
  n the global expected batch (dp.expected_batch_size, default: the loader's batch size x world size);
- on_fit_start: attaches Opacus's per-sample gradient hooks to the module (GradSampleHooks, no wrapper) and
  wraps the module's optimizer in the method's DP optimizer (lightning_modules/privacy/optimizers.py):
  g~ = (sum_i f_i g_i + N(0, sigma^2 S^2 I)) / n. sigma is dp.noise_multiplier, or calibrated so that the
  planned steps spend exactly dp.target_epsilon. With a target, the run stops before the step that would
  exceed it (the fit loop's max_steps is capped to the last affordable step);
- every step: records the step's releases in a ledger (accounting.py); logs `privacy/epsilon` (and Z,
  bounds) every dp.log_every_n_steps steps and at the end of every epoch and of training. Methods that release
  counts also log the epsilon of the other count accounting (`privacy/epsilon_separate_accounting`, the
  paper's, when dp.count_accounting=joint), for comparison only.

DDP: every rank trains on its share of one global Poisson batch, rank 0 adds the noise once and the noisy
sums are all-reduced, so the accounting is that of one process with the global q.

Requirements on the module: its training loss is the mean over the batch of per-example losses (Opacus's
loss_reduction="mean"), it has one optimizer, automatic optimisation, and batches are dicts (group labels
under dp.group_key, needed by dpsgd_f).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
)
from lightning.pytorch.utilities import rank_zero_info
from opacus.grad_sample import GradSampleHooks
from opacus.validators import ModuleValidator
from torch import nn

from lightning_modules.privacy.accounting import (
    ACCOUNTANTS,
    COUNT_ACCOUNTING,
    PrivacyLedger,
    calibrate_noise_multiplier,
    max_steps_within_budget,
    step_noise_multipliers,
)
from lightning_modules.privacy.optimizers import METHODS, PrivateOptimizer
from lightning_modules.privacy.sampling import is_poisson_loader, poisson_loader

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
               nn.LazyBatchNorm1d, nn.LazyBatchNorm2d, nn.LazyBatchNorm3d)
GRAD_SAMPLE_MODES = ("hooks", "functorch")
COUNT_METHODS = ("dpsgd_f", "dpsgd_global_adapt")
# Opacus's backward hook on the first layer fires for the output gradient only (inputs need no gradient): expected.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect to module outputs")


class DPConfigError(ValueError):
    """A DP setting or combination that cannot give the stated guarantee; the message names the key."""


class DifferentialPrivacy(Callback):
    """Private training by config (see the module docstring).

    Args:
        method: dpsgd | dpsgd_f | dpsgd_global | dpsgd_global_adapt.
        noise_multiplier: sigma of the gradient release; null to calibrate it from target_epsilon.
        target_epsilon: the budget; with noise_multiplier null sigma is calibrated to spend it over the planned
            steps, otherwise training stops before the step that would exceed it.
        delta: the delta of (epsilon, delta). accountant: rdp | prv | gdp (Opacus's accountants; Opacus has no PLD
            accountant, PRV is its numerical privacy-loss-distribution one).
        max_grad_norm: C0. grad_sample_mode: hooks | functorch (how Opacus computes per-sample gradients).
        poisson_sampling: must be true (both accountants assume it).
        expected_batch_size: global expected batch n; null: the training loader's batch size x world size.
        seed: seeds the Poisson masks (identical on all ranks).
        group_key: the batch entry with group labels (dpsgd_f; also passed on to the fairness monitor).
        num_groups, count_noise_multiplier: DPSGD-F's groups and sigma_c; sigma2 for Global-Adapt.
        count_accounting: joint | separate, how count releases are charged (accounting.py).
        z: DPSGD-Global's Z. z0, z_lr, z_threshold, z_min, z_max, count_denominator: Global-Adapt's Z0, eta_Z,
            gamma, clamps (z_min null: C0, the paper's floor), and the count's denominator (actual, the paper's
            |B| | expected).
        dpsgd_f_rule: paper (Alg. 4, m~ / |B|) | noisy_total (m~ / b~) | mean_ratio (the authors' code).
        log_every_n_steps: how often epsilon and the method's scalars are logged.
    """

    def __init__(
        self,
        method: str = "dpsgd",
        noise_multiplier: float | None = None,
        target_epsilon: float | None = None,
        delta: float = 1e-5,
        accountant: str = "rdp",
        max_grad_norm: float = 1.0,
        grad_sample_mode: str = "hooks",
        poisson_sampling: bool = True,
        expected_batch_size: float | None = None,
        seed: int = 0,
        group_key: str = "group",
        num_groups: int | None = None,
        count_noise_multiplier: float | None = None,
        count_accounting: str = "joint",
        z: float = 100.0,
        z0: float = 50.0,
        z_lr: float = 0.1,
        z_threshold: float = 0.7,
        z_min: float | None = None,
        z_max: float | None = None,
        count_denominator: str = "actual",
        dpsgd_f_rule: str = "paper",
        log_every_n_steps: int = 10,
    ) -> None:
        if method not in METHODS:
            raise DPConfigError(f"dp.method={method!r}; choose one of {sorted(METHODS)} (or dp=none for no privacy)")
        if accountant not in ACCOUNTANTS:
            raise DPConfigError(f"dp.accountant={accountant!r}; choose one of {ACCOUNTANTS}")
        if count_accounting not in COUNT_ACCOUNTING:
            raise DPConfigError(f"dp.count_accounting={count_accounting!r}; choose one of {COUNT_ACCOUNTING}")
        if grad_sample_mode not in GRAD_SAMPLE_MODES:
            why = (" ghost clipping needs the per-example losses, but a LightningModule returns the batch-mean loss; "
                   "it is benchmarked in experiments/benchmarks/dp_step.py" if "ghost" in grad_sample_mode else "")
            raise DPConfigError(f"dp.grad_sample_mode={grad_sample_mode!r} is not supported here; choose one of "
                                f"{GRAD_SAMPLE_MODES}.{why}")
        if not poisson_sampling:
            raise DPConfigError(
                f"dp.poisson_sampling=false: the {accountant} accountant assumes Poisson-sampled batches; a shuffled "
                "fixed-size loader would make the reported epsilon wrong. Keep dp.poisson_sampling=true."
            )
        if noise_multiplier is None and target_epsilon is None:
            raise DPConfigError("set dp.noise_multiplier or dp.target_epsilon (or both: then training stops at the budget)")
        if method == "dpsgd_f" and not num_groups:
            raise DPConfigError("dp=dpsgd_f needs dp.num_groups (e.g. 10 for the digit classes)")
        if method in COUNT_METHODS and count_noise_multiplier is None:
            raise DPConfigError(f"dp={method} releases counts: set dp.count_noise_multiplier (paper: 8 for dpsgd_f, 10 for global_adapt)")
        self.method = method
        self.noise_multiplier = noise_multiplier
        self.target_epsilon = target_epsilon
        self.delta = delta
        self.accountant = accountant
        self.max_grad_norm = max_grad_norm
        self.grad_sample_mode = grad_sample_mode
        self.expected_batch_size = expected_batch_size
        self.seed = seed
        self.group_key = group_key
        self.count_accounting = count_accounting
        self.method_kwargs: dict[str, Any] = {
            "dpsgd": {},
            "dpsgd_f": {"num_groups": num_groups, "count_noise_multiplier": count_noise_multiplier, "bound_rule": dpsgd_f_rule},
            "dpsgd_global": {"z": z},
            "dpsgd_global_adapt": {"z0": z0, "z_lr": z_lr, "z_threshold": z_threshold, "z_min": z_min, "z_max": z_max,
                                   "count_noise_multiplier": count_noise_multiplier, "count_denominator": count_denominator},
        }[method]
        self.count_noise_multiplier = count_noise_multiplier if method in COUNT_METHODS else None
        self.log_every_n_steps = log_every_n_steps

        self.loader = None
        self.ledger: PrivacyLedger | None = None
        self.other_ledger: PrivacyLedger | None = None  # count methods: the other count accounting, for comparison
        self.optimizer: PrivateOptimizer | None = None
        self.hooks: GradSampleHooks | None = None
        self.step_budget: int | None = None  # the global step after which training must stop
        self._hook_owner: Any = None
        self._restored: dict[str, Any] = {}

    # -- checks -----------------------------------------------------------------------------------------------
    @staticmethod
    def check_module(module: nn.Module) -> None:
        """Refuse layers without per-example gradients (BatchNorm first, with the fix) and what Opacus rejects."""
        for name, sub in module.named_modules():
            if isinstance(sub, BATCH_NORMS):
                raise DPConfigError(
                    f"{name} is a {type(sub).__name__}: batch norm mixes the examples of a batch, so per-example "
                    "gradients (and DP-SGD's guarantee) do not exist. Use GroupNorm instead (for SmallCNN: "
                    "model.net.norm=group)."
                )
        errors = ModuleValidator.validate(module, strict=False)
        if errors:
            raise DPConfigError("Opacus cannot privatize this model: " + "; ".join(str(e) for e in errors))

    def check_trainer(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        strategy = trainer.strategy
        if isinstance(strategy, (FSDPStrategy, ModelParallelStrategy)):
            raise DPConfigError(
                "DP training with FSDP is not supported: Opacus shards per-sample clipping only through ghost "
                "clipping (grad_sample_mode=ghost_fsdp), which needs per-example losses. Use strategy=ddp."
            )
        if isinstance(strategy, DeepSpeedStrategy) or not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
            raise DPConfigError(f"DP training supports one device or DDP; got strategy {type(strategy).__name__}")
        if trainer.accumulate_grad_batches != 1:
            raise DPConfigError(
                f"trainer.accumulate_grad_batches={trainer.accumulate_grad_batches}: one Poisson batch must be one "
                "optimizer step (raise data.batch_size / dp.expected_batch_size instead)"
            )
        if trainer.gradient_clip_val:
            raise DPConfigError("trainer.gradient_clip_val must be null under DP: clipping is per example (dp.max_grad_norm)")
        if str(trainer.precision) not in ("32-true", "32", "64-true", "64"):
            raise DPConfigError(f"trainer.precision={trainer.precision}: DP training runs in full precision (32-true)")
        if not pl_module.automatic_optimization:
            raise DPConfigError("DP training needs automatic optimisation (one optimizer.step per Poisson batch)")

    # -- Lightning hooks --------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.check_trainer(trainer, pl_module)
        self.check_module(pl_module)
        owner = trainer.datamodule if trainer.datamodule is not None else pl_module
        original = owner.train_dataloader
        world, rank = trainer.world_size, trainer.global_rank

        def private_train_dataloader():
            loader = original()
            batch_size = self.expected_batch_size or (loader.batch_size * world if loader.batch_size else None)
            if batch_size is None:
                raise DPConfigError("the training loader has no batch_size: set dp.expected_batch_size")
            self.loader = poisson_loader(loader, batch_size, self.seed, world, rank)
            return self.loader

        owner.train_dataloader = private_train_dataloader  # the public hook, on this instance only
        self._hook_owner = owner

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        planned = trainer.estimated_stepping_batches  # loads the training loader (through the hook above) ...
        if self.loader is None and self._hook_owner is not None and trainer.max_epochs == -1:
            # ... except when the run is bounded by steps alone (trainer.max_epochs=-1): Lightning then
            # answers from max_steps without loading anything, so build the loader here.
            self._hook_owner.train_dataloader()
        if self.loader is None:
            raise DPConfigError(
                "the training data did not come from the datamodule's or module's train_dataloader hook (was a "
                "loader passed to trainer.fit?), so it is not Poisson-sampled as the accountant assumes"
            )
        sampler = self.loader.sampler
        n, q = sampler.sample_rate * sampler.dataset_size, sampler.sample_rate
        self.ledger = PrivacyLedger(q, self.delta, self.accountant)
        if self._restored:
            self.ledger.load_state_dict(self._restored["ledger"])
            self.noise_multiplier = self._restored["noise_multiplier"]
        per_step = lambda sigma: step_noise_multipliers(sigma, self.count_noise_multiplier, self.count_accounting)
        if self.noise_multiplier is None:
            steps = int(planned) if math.isfinite(planned) else None
            if steps is None:
                raise DPConfigError("dp.target_epsilon without dp.noise_multiplier needs a finite trainer.max_epochs or max_steps")
            self.noise_multiplier = calibrate_noise_multiplier(self.target_epsilon, self.delta, q, steps, self.accountant, per_step)

        if len(trainer.optimizers) != 1:
            raise DPConfigError(f"DP training supports one optimizer; the module configured {len(trainer.optimizers)}")
        self.optimizer = METHODS[self.method](
            trainer.optimizers[0],
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            expected_batch_size=n,
            count_accounting=self.count_accounting,
            world_size=trainer.world_size,
            rank=trainer.global_rank,
            **self.method_kwargs,
        )
        if self._restored.get("z") is not None:
            self.optimizer.z = self._restored["z"]
        other = "separate" if self.count_accounting == "joint" else "joint"
        if self.count_noise_multiplier is not None:
            self.other_ledger = PrivacyLedger(q, self.delta, self.accountant)
            if self._restored.get("other_ledger"):
                self.other_ledger.load_state_dict(self._restored["other_ledger"])

        def record(opt: PrivateOptimizer) -> None:
            self.ledger.record(opt.step_noise_multipliers())
            if self.other_ledger is not None:
                self.other_ledger.record(step_noise_multipliers(opt.noise_multiplier, self.count_noise_multiplier, other))

        self.optimizer.attach_step_hook(record)
        self.hooks = GradSampleHooks(pl_module, batch_first=True, loss_reduction="mean",
                                     force_functorch=self.grad_sample_mode == "functorch")
        trainer.optimizers = [self.optimizer]

        if self.target_epsilon is not None:
            affordable = max_steps_within_budget(self.ledger, per_step(self.noise_multiplier), self.target_epsilon)
            self.step_budget = self.ledger.num_steps + affordable
        rank_zero_info(
            f"[dp] {self.method}: sigma={self.noise_multiplier:.4f}, C0={self.max_grad_norm}, q={q:.5f} "
            f"(expected batch {n:g} of {sampler.dataset_size}), {planned} planned steps"
            + (f", budget eps={self.target_epsilon} allows {self.step_budget} steps" if self.step_budget is not None else "")
            + (f", count sigma={self.count_noise_multiplier} ({self.count_accounting} accounting)" if self.count_noise_multiplier else "")
        )
        self._log(trainer, {"privacy/noise_multiplier": self.noise_multiplier, "privacy/sample_rate": q,
                            "privacy/expected_batch_size": n})

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not is_poisson_loader(trainer.train_dataloader):
            raise DPConfigError("the training loader is not the Poisson-sampled one the accountant assumes")
        if trainer.global_step != self.ledger.num_steps:  # loops are restored after on_fit_start
            raise DPConfigError(
                f"the run is at step {trainer.global_step} but the privacy ledger recorded {self.ledger.num_steps} "
                "private steps (a checkpoint of a non-private or differently configured run?)"
            )
        self.loader.sampler.resume_at(trainer.global_step)
        if self.step_budget is not None:
            loop = trainer.fit_loop.epoch_loop
            if loop.max_steps == -1 or loop.max_steps > self.step_budget:
                loop.max_steps = self.step_budget  # stop before the step that would exceed the budget

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        groups = batch.get(self.group_key) if isinstance(batch, Mapping) else None
        if groups is None and self.method == "dpsgd_f":
            keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise DPConfigError(f"dp=dpsgd_f needs group labels: the training batch has no {self.group_key!r} entry ({keys})")
        self.optimizer.groups = groups

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step % self.log_every_n_steps == 0:
            self._log_privacy(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log_privacy(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epsilon = self._log_privacy(trainer)
        stopped = self.step_budget is not None and trainer.global_step >= self.step_budget
        rank_zero_info(f"[dp] {trainer.global_step} private steps, epsilon={epsilon:.4f} at delta={self.delta}"
                       + (" (stopped: the next step would exceed the budget)" if stopped else ""))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.hooks is not None:
            self.hooks.cleanup()
            self.hooks = None
        if self._hook_owner is not None and "train_dataloader" in vars(self._hook_owner):
            del self._hook_owner.train_dataloader  # back to the class's own hook
        self._hook_owner = None

    # -- logging and state ------------------------------------------------------------------------------------
    def epsilon(self) -> float:
        return self.ledger.epsilon() if self.ledger is not None else 0.0

    def _log_privacy(self, trainer: L.Trainer) -> float:
        epsilon = self.epsilon()
        metrics = {"privacy/epsilon": epsilon, "privacy/steps": float(trainer.global_step)}
        if self.other_ledger is not None:
            other = "separate" if self.count_accounting == "joint" else "joint"
            metrics[f"privacy/epsilon_{other}_accounting"] = self.other_ledger.epsilon()
        if self.optimizer is not None:
            metrics |= {f"privacy/{k}": v for k, v in self.optimizer.scalars().items()}
        self._log(trainer, metrics)
        return epsilon

    @staticmethod
    def _log(trainer: L.Trainer, metrics: dict[str, float]) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        if self.ledger is None:
            return {}
        return {"method": self.method, "ledger": self.ledger.state_dict(), "noise_multiplier": self.noise_multiplier,
                "z": getattr(self.optimizer, "z", None),
                "other_ledger": self.other_ledger.state_dict() if self.other_ledger is not None else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if state_dict["method"] != self.method:
            raise DPConfigError(f"the checkpoint was trained with dp={state_dict['method']}, not dp={self.method}")
        self._restored = state_dict
