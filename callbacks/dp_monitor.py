"""The DP fairness monitor: what clipping does to each group while training, and who pays for privacy at test.

Every `every_n_steps` training steps, at the parameters theta_t of that step, from the per-example gradients g_i
of the batch B, the factors f_i the method applied (in a non-private run: the factors DP-SGD with bound C0 WOULD
apply), and the group labels (sums over all ranks under DDP):

    g_B = sum_{i in B} g_i / n      gbar_B = sum_{i in B} f_i g_i / n      rho = ||gbar_B|| / ||g_B||   (fair/rho)

and, as the paper measures it, against each group's gradient g_Dk on the FULL training set (or on at most
`max_examples_per_group` fixed examples of it), recomputed at theta_t with the per-example hooks switched off:

    direction error  DE_k = cos(g_Dk, g_B) - cos(g_Dk, gbar_B)        fair/direction_error/group_<k>
                     (Prop. 3; > 0: clipping turns the update away from group k)
    cosines          fair/cos_gDk_gB/group_<k>, fair/cos_gDk_gbarB/group_<k>; norm fair/norm_gDk/group_<k>

For the two `compare` groups, the decomposition of the step's excess risk (lightning_modules/privacy/
decomposition.py; HVPs by double backprop, Tr(H_k) by `hutchinson_probes` Rademacher probes):
fair/R_dir_inner, R_dir_hess, R_mag_inner, R_mag_hess, R_noise, R_dir, R_mag, R_clip, trace_H (/group_<k>),
with eta the optimizer's learning rate (plain SGD assumed) and the noise std sigma S / n of the update.

From the batch alone: fair/clip_fraction/group_<k> = #{i in B_k: ||g_i|| > the method's bound} / |B_k| (the bound
is C0 for DP-SGD, C_k for DPSGD-F, Z for the Global methods), fair/grad_norm/group_<k>, the in-batch
magnitude ratio ||mean_{B_k} f_i g_i|| / ||mean_{B_k} g_i||, and the in-batch direction error
(fair/direction_error_in_batch/group_<k>, against the mean of the few examples of k in B: noisy, kept for
comparison). For Global-Adapt also fair/Z and fair/frac_above_gamma_Z, the fraction #{||g_i|| > gamma Z} / |B|
that moves Z (distinct from the clip fraction, which counts ||g_i|| > Z).

These diagnostics read training data outside the privacy accounting: they are analysis, not covered by epsilon.

At test: per-group accuracy and mean loss (fair/test/acc/group_<k>, fair/test/loss/group_<k>), written also
as the MLflow artifact fair/test_metrics.json. Given a reference non-private run (`reference`: an MLflow run
id or the path of such a json), with groups a, b = `compare` (default 8 and 2):

    privacy cost     pi_k = acc_ref(k) - acc(k)       privacy cost gap      PCG = |pi_a - pi_b|
    excessive risk   R_k  = loss(k) - loss_ref(k)     excessive risk gap    ERG = |R_a - R_b|

What the module must offer: batches are dicts with inputs (input_key), integer targets (target_key) and groups
(group_key); `module(batch[input_key])` returns logits; the training loss is a batch mean. Per-example gradients
come from Opacus hooks: the privacy callback's in a private run, the monitor's own (switched on only on
monitoring steps) otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import MLFlowLogger
from opacus.grad_sample import GradSampleHooks
from torch import Tensor

from callbacks.mlflow_logger import metric_name
from callbacks.privacy import DifferentialPrivacy
from lightning_modules.privacy import decomposition as dec
from lightning_modules.privacy.clipping import dpsgd_factors, per_sample_norms
from lightning_modules.privacy.optimizers import PrivateOptimizer
from lightning_modules.privacy.sampling import IndexListDataset

_EPS = 1e-12


# -- the math, as functions of tensors ---------------------------------------------------------------------------
def cosine(a: Tensor, b: Tensor) -> Tensor:
    """cos(a, b) along the last dimension (0 when either vector is 0)."""
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=_EPS)


def group_gradient_sums(
    grads: Tensor, factors: Tensor, clipped: Tensor, groups: Tensor, num_groups: int
) -> dict[str, Tensor]:
    """Per-group sums of one batch (summable over ranks): grads [B, P], factors / clipped / groups [B].

    Returns sum (sum_{i in B_k} g_i, [K, P]), clipped_sum (sum f_i g_i), count, clipped_count, norm_sum ([K]).
    """
    groups = groups.long().to(grads.device)
    if len(groups) and (groups.min() < 0 or groups.max() >= num_groups):
        raise ValueError(f"group labels must be in [0, {num_groups}) (callbacks.dp_monitor.num_groups)")
    zeros_kp = grads.new_zeros(num_groups, grads.shape[1])
    zeros_k = grads.new_zeros(num_groups)
    return {
        "sum": zeros_kp.index_add(0, groups, grads),
        "clipped_sum": zeros_kp.index_add(0, groups, factors.to(grads)[:, None] * grads),
        "count": zeros_k.index_add(0, groups, torch.ones_like(factors, dtype=grads.dtype)),
        "clipped_count": zeros_k.index_add(0, groups, clipped.to(grads.dtype)),
        "norm_sum": zeros_k.index_add(0, groups, grads.norm(dim=1)),
    }


def fairness_stats(sums: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per-group metrics [K] from `group_gradient_sums` (see the module docstring); NaN for absent groups."""
    count = sums["count"]
    present = count > 0
    g_batch, g_batch_clipped = sums["sum"].sum(0), sums["clipped_sum"].sum(0)
    direction_error = cosine(sums["sum"], g_batch) - cosine(sums["sum"], g_batch_clipped)
    magnitude_ratio = sums["clipped_sum"].norm(dim=1) / sums["sum"].norm(dim=1).clamp(min=_EPS)
    nan = torch.full_like(count, float("nan"))
    return {
        "clip_fraction": torch.where(present, sums["clipped_count"] / count.clamp(min=1), nan),
        "grad_norm": torch.where(present, sums["norm_sum"] / count.clamp(min=1), nan),
        "direction_error_in_batch": torch.where(present, direction_error, nan),
        "magnitude_ratio": torch.where(present, magnitude_ratio, nan),
        "batch_magnitude_ratio": g_batch_clipped.norm() / g_batch.norm().clamp(min=_EPS),
    }


def privacy_gaps(test: dict[str, dict[int, float]], reference: dict[str, dict[int, float]], a: int, b: int) -> dict[str, float]:
    """pi_k = acc_ref(k) - acc(k), R_k = loss(k) - loss_ref(k); PCG = |pi_a - pi_b|, ERG = |R_a - R_b|."""
    for name, table in (("reference", reference), ("test", test)):
        for key in ("acc", "loss"):
            missing = [k for k in (a, b) if k not in table.get(key, {})]
            if missing:
                raise ValueError(f"the {name} metrics have no {key} for group(s) {missing}")
    cost = {k: reference["acc"][k] - test["acc"][k] for k in (a, b)}
    risk = {k: test["loss"][k] - reference["loss"][k] for k in (a, b)}
    return {
        f"privacy_cost/group_{a}": cost[a], f"privacy_cost/group_{b}": cost[b], "privacy_cost_gap": abs(cost[a] - cost[b]),
        f"excessive_risk/group_{a}": risk[a], f"excessive_risk/group_{b}": risk[b], "excessive_risk_gap": abs(risk[a] - risk[b]),
    }


def load_reference(reference: str, client: Any = None) -> dict[str, dict[int, float]]:
    """{"acc": {k: ...}, "loss": {k: ...}} from a fair/test_metrics.json file or an MLflow run's final metrics."""
    path = Path(reference).expanduser()
    if path.suffix == ".json" or path.exists():
        if not path.exists():
            raise FileNotFoundError(f"callbacks.dp_monitor.reference={reference}: no such metrics file")
        raw = json.loads(path.read_text())
        return {key: {int(k): float(v) for k, v in raw[key].items()} for key in ("acc", "loss")}
    if client is None:
        raise ValueError(f"callbacks.dp_monitor.reference={reference} is not a file and there is no MLflow client to look it up")
    metrics = client.get_run(reference).data.metrics
    table: dict[str, dict[int, float]] = {"acc": {}, "loss": {}}
    for key, value in metrics.items():
        for kind in ("acc", "loss"):
            prefix = f"fair/test/{kind}/group_"
            if key.startswith(prefix):
                table[kind][int(key[len(prefix):])] = float(value)
    if not table["acc"]:
        raise ValueError(f"MLflow run {reference} has no fair/test/acc/group_* metrics (was the monitor on?)")
    return table


# -- the callback -------------------------------------------------------------------------------------------------
class DPFairnessMonitor(Callback):
    """Per-group gradient misalignment while training and privacy cost at test (see the module docstring).

    Args:
        every_n_steps: monitor every k-th training step.
        num_groups: groups are 0..num_groups-1.
        max_grad_norm: C0 of the DP-SGD clipping shown in a non-private run.
        compare: the two groups of the privacy cost and excessive risk gaps and of the R decomposition.
        reference: null, an MLflow run id, or a fair/test_metrics.json path of a non-private run.
        group_key, input_key, target_key: the batch entries.
        full_data: measure g_Dk on the training set (true) or skip the full-data measurements (false).
        max_examples_per_group: cap on the training examples per group used for g_Dk and H_k (the first ones in
            dataset order; null: all).
        decompose: log the R_dir / R_mag / R_noise decomposition for the compare groups.
        hutchinson_probes: Rademacher probes for Tr(H_k) (the paper: 100).
        noise_multiplier: sigma for R_noise in a NON-private run (what DP-SGD's noise would cost); a private run
            uses its own.
        chunk_size: examples per forward pass of the full-data gradients.
    """

    def __init__(
        self,
        every_n_steps: int = 10,
        num_groups: int = 10,
        max_grad_norm: float = 1.0,
        compare: tuple[int, int] | list[int] = (8, 2),
        reference: str | None = None,
        group_key: str = "group",
        input_key: str = "x",
        target_key: str = "y",
        full_data: bool = True,
        max_examples_per_group: int | None = None,
        decompose: bool = True,
        hutchinson_probes: int = 100,
        noise_multiplier: float = 0.0,
        chunk_size: int = 1000,
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"callbacks.dp_monitor.every_n_steps must be >= 1, got {every_n_steps}")
        if len(compare) != 2:
            raise ValueError(f"callbacks.dp_monitor.compare takes two groups, got {compare}")
        if hutchinson_probes < 1:
            raise ValueError(f"callbacks.dp_monitor.hutchinson_probes must be >= 1, got {hutchinson_probes}")
        self.every_n_steps = every_n_steps
        self.num_groups = num_groups
        self.max_grad_norm = max_grad_norm
        self.compare = (int(compare[0]), int(compare[1]))
        self.reference = reference
        self.group_key, self.input_key, self.target_key = group_key, input_key, target_key
        self.full_data = full_data
        self.max_examples_per_group = max_examples_per_group
        self.decompose = decompose
        self.hutchinson_probes = hutchinson_probes
        self.noise_multiplier = noise_multiplier
        self.chunk_size = chunk_size
        self.hooks: GradSampleHooks | None = None
        self._monitor_step = False
        self._theta: dict[str, Tensor] = {}
        self._lr = 0.0
        self._groups_data: dict[int, tuple[Tensor, Tensor]] = {}
        self._test: dict[str, Tensor] = {}

    # -- training -------------------------------------------------------------------------------------------------
    def _private_optimizer(self, trainer: L.Trainer) -> PrivateOptimizer | None:
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        return optimizer if isinstance(optimizer, PrivateOptimizer) else None

    def _all_hooks(self, trainer: L.Trainer) -> list[GradSampleHooks]:
        hooks = [cb.hooks for cb in trainer.callbacks if isinstance(cb, DifferentialPrivacy) and cb.hooks is not None]
        return hooks + ([self.hooks] if self.hooks is not None else [])

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._private_optimizer(trainer) is None:
            DifferentialPrivacy.check_module(pl_module)
            self.hooks = GradSampleHooks(pl_module, batch_first=True, loss_reduction="mean")
            self.hooks.disable_hooks()
        if self.full_data:
            self._groups_data = self._training_set_by_group(trainer)

    def _training_set_by_group(self, trainer: L.Trainer) -> dict[int, tuple[Tensor, Tensor]]:
        """{k: (inputs, targets)} of the training set (at most max_examples_per_group each), in dataset order."""
        dataset = getattr(trainer.train_dataloader, "dataset", None)
        if isinstance(dataset, IndexListDataset):  # the privacy callback's Poisson loader: the examples beneath
            dataset = dataset.dataset
        if dataset is None:
            raise ValueError("the DP monitor's full-data gradients need a training DataLoader with a dataset "
                             "(or set callbacks.dp_monitor.full_data=false)")
        xs, ys, gs = [], [], []
        for batch in torch.utils.data.DataLoader(dataset, batch_size=self.chunk_size, shuffle=False):
            xs.append(batch[self.input_key])
            ys.append(batch[self.target_key])
            gs.append(batch[self.group_key])
        x, y, g = torch.cat(xs), torch.cat(ys), torch.cat(gs).long()
        out = {}
        for k in range(self.num_groups):
            index = torch.nonzero(g == k).flatten()[: self.max_examples_per_group]
            if len(index):
                out[k] = (x[index], y[index])
        return out

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._monitor_step = trainer.global_step % self.every_n_steps == 0
        if not self._monitor_step:
            return
        if self.hooks is not None:
            self.hooks.enable_hooks()
        if self.full_data:  # theta_t: the step changes the parameters in place before on_train_batch_end
            self._theta = {k: p.detach().clone() for k, p in pl_module.named_parameters() if p.requires_grad}
            self._lr = float(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._monitor_step:
            return
        params = [p for p in pl_module.parameters() if p.requires_grad]
        grad_samples = [getattr(p, "grad_sample", None) for p in params]
        if any(g is None for g in grad_samples):
            raise RuntimeError("the DP monitor found no per-example gradients (p.grad_sample) after the step")
        grads = torch.cat([g.reshape(len(g), -1) for g in grad_samples], dim=1).detach().float()
        optimizer = self._private_optimizer(trainer)
        if optimizer is not None and optimizer.last is not None:
            factors, clipped = optimizer.last.factors, optimizer.last.clipped
        else:  # non-private: what DP-SGD's clipping would do
            norms = per_sample_norms(grad_samples) if len(grads) else grads.new_zeros(0)
            factors, clipped = dpsgd_factors(norms, self.max_grad_norm), norms > self.max_grad_norm
        if self.hooks is not None:
            self.hooks.disable_hooks()
            for p in params:
                p.grad_sample = None
        sums = group_gradient_sums(grads, factors, clipped, batch[self.group_key], self.num_groups)
        sums = {k: trainer.strategy.reduce(v, reduce_op="sum") for k, v in sums.items()}
        stats = fairness_stats(sums)
        metrics = {"fair/magnitude_ratio_in_batch": float(stats.pop("batch_magnitude_ratio"))}
        for k in torch.nonzero(sums["count"] > 0).flatten().tolist():
            metrics |= {metric_name(f"fair/{name}/group={k}"): float(values[k]) for name, values in stats.items()}
        if optimizer is not None:
            metrics |= {f"fair/{name}": value for name, value in optimizer.scalars().items()}
        if self.full_data and self._groups_data:
            # the update's denominator n: the expected batch size (private) or |B| (Lightning's mean loss)
            n = optimizer.expected_batch_size if optimizer is not None else float(sums["count"].sum())
            g_batch, g_clipped = sums["sum"].sum(0) / n, sums["clipped_sum"].sum(0) / n
            if optimizer is not None:
                noise_std = optimizer.noise_multiplier * optimizer.sensitivity() / n
            else:
                noise_std = self.noise_multiplier * self.max_grad_norm / n
            metrics |= self._full_data_metrics(trainer, pl_module, g_batch, g_clipped, noise_std)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def _full_data_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule, g_batch: Tensor, g_clipped: Tensor,
                           noise_std: float) -> dict[str, float]:
        """Direction errors against g_Dk for every group, and the R decomposition for the compare groups, at theta_t."""
        hooks = self._all_hooks(trainer)
        enabled = [h.hooks_enabled for h in hooks]
        for h in hooks:
            h.disable_hooks()
        device = next(iter(self._theta.values())).device
        theta, module = self._theta, pl_module
        metrics: dict[str, float] = {"fair/rho": float(g_clipped.norm() / g_batch.norm().clamp(min=_EPS))}
        try:
            with torch.enable_grad():
                for k, (x, y) in self._groups_data.items():
                    x, y = x.to(device), y.to(device)
                    loss_k = dec.mean_loss_fn(module, x, y)
                    if self.decompose and k in self.compare:
                        hessian = dec.HessianOperator(loss_k, theta)
                        g_k = hessian.grad.detach()
                        # probes seeded by the step: the same estimates after a resume, no global RNG consumed
                        probes = torch.Generator().manual_seed(trainer.global_step)
                        trace = hessian.trace(self.hutchinson_probes, probes) if noise_std > 0 else None
                        terms = dec.excess_risk_terms(g_k, g_batch, g_clipped, hessian, self._lr, noise_std, trace)
                        terms.pop("rho")
                        if trace is not None:
                            terms["trace_H"] = trace
                        metrics |= {metric_name(f"fair/{name}/group={k}"): v for name, v in terms.items()}
                    else:
                        g_k = dec.gradient(loss_k, theta)
                    metrics |= {
                        metric_name(f"fair/direction_error/group={k}"): dec.direction_error(g_k, g_batch, g_clipped),
                        metric_name(f"fair/cos_gDk_gB/group={k}"): dec.cosine(g_k, g_batch),
                        metric_name(f"fair/cos_gDk_gbarB/group={k}"): dec.cosine(g_k, g_clipped),
                        metric_name(f"fair/norm_gDk/group={k}"): float(g_k.norm()),
                    }
        finally:
            for h, on in zip(hooks, enabled):
                if on:
                    h.enable_hooks()
        return metrics

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.hooks is not None:
            self.hooks.cleanup()
            self.hooks = None

    # -- test -----------------------------------------------------------------------------------------------------
    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        zeros = torch.zeros(self.num_groups, dtype=torch.float64, device=pl_module.device)
        self._test = {"count": zeros.clone(), "correct": zeros.clone(), "loss": zeros.clone()}

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        with torch.no_grad():
            logits = pl_module(batch[self.input_key])
            target = batch[self.target_key]
            loss = F.cross_entropy(logits.float(), target, reduction="none").double()
            correct = (logits.argmax(-1) == target).double()
        groups = batch[self.group_key].long()
        self._test["count"].index_add_(0, groups, torch.ones_like(loss))
        self._test["correct"].index_add_(0, groups, correct)
        self._test["loss"].index_add_(0, groups, loss)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        totals = {k: trainer.strategy.reduce(v, reduce_op="sum") for k, v in self._test.items()}
        present = torch.nonzero(totals["count"] > 0).flatten().tolist()
        table = {"acc": {k: float(totals["correct"][k] / totals["count"][k]) for k in present},
                 "loss": {k: float(totals["loss"][k] / totals["count"][k]) for k in present}}
        for kind, values in table.items():
            for k, value in values.items():
                pl_module.log(metric_name(f"fair/test/{kind}/group={k}"), value)
        if self.reference:
            client = trainer.logger.experiment if isinstance(trainer.logger, MLFlowLogger) else None
            gaps = privacy_gaps(table, load_reference(self.reference, client), *self.compare)
            for name, value in gaps.items():
                pl_module.log(metric_name(f"fair/{name}"), value)
        self._write_table(trainer, table)

    @staticmethod
    def _write_table(trainer: L.Trainer, table: dict[str, dict[int, float]]) -> None:
        if trainer.global_rank != 0:
            return
        logger = trainer.logger
        if isinstance(logger, MLFlowLogger) and logger.run_id is not None:
            logger.experiment.log_dict(logger.run_id, table, "fair/test_metrics.json")
        else:
            path = Path(trainer.default_root_dir) / "fair_test_metrics.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(table, indent=1))
