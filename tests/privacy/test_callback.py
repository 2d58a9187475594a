"""The privacy callback on real Lightning training: it learns, stops at the budget, resumes, and refuses."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader

from callbacks.dp_monitor import DPFairnessMonitor
from callbacks.privacy import DifferentialPrivacy, DPConfigError
from datamodules.digits import DigitsDataModule, TensorDictDataset
from lightning_modules.classifier import Classifier
from lightning_modules.nn.cnn import SmallCNN
from lightning_modules.privacy.accounting import compute_epsilon

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook", "ignore:.*does not have many workers",
                                        "ignore:.*LeafSpec")


def _module(norm: str = "group", lr: float = 0.5) -> Classifier:
    optimizer = lambda params: torch.optim.SGD(params, lr=lr)
    return Classifier(SmallCNN(1, 10, width=8, norm=norm), num_classes=10, optimizer=optimizer)


def _trainer(callbacks, tmp_path, **kwargs) -> L.Trainer:
    options = dict(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
                   enable_checkpointing=False)
    return L.Trainer(callbacks=callbacks, **(options | kwargs))


def test_private_training_learns_stops_at_the_budget_and_resumes(tmp_path):
    torch.manual_seed(0)
    data = DigitsDataModule(batch_size=64, seed=0)
    dp = DifferentialPrivacy(method="dpsgd_global_adapt", noise_multiplier=1.0, target_epsilon=4.0, max_grad_norm=1.0,
                             z0=50.0, count_noise_multiplier=10.0, delta=1e-5)
    monitor = DPFairnessMonitor(every_n_steps=20, hutchinson_probes=2)  # attached, rarely: its maths has its own tests
    module = _module(lr=2.0)
    trainer = _trainer([dp, monitor], tmp_path, max_epochs=20, enable_checkpointing=True)
    trainer.fit(module, datamodule=data)
    # the budget: q = 64 / 1257, sigma_eff of the joint (gradient, count) release; stopped before exceeding it
    q = dp.loader.sampler.sample_rate
    sigma_eff = (1.0**-2 + 10.0**-2) ** -0.5
    assert trainer.global_step == dp.step_budget < 20 * len(dp.loader)
    assert dp.epsilon() == pytest.approx(compute_epsilon({sigma_eff: trainer.global_step}, q, 1e-5))
    assert dp.epsilon() <= 4.0 < compute_epsilon({sigma_eff: trainer.global_step + 1}, q, 1e-5)
    # the paper's accounting (an extra sampled Gaussian step per count release), logged for comparison
    assert dp.other_ledger.epsilon() == pytest.approx(compute_epsilon({1.0: trainer.global_step, 10.0: trainer.global_step}, q, 1e-5))
    assert dp.optimizer.z < 30.0  # Z adapted from Z0 = 50 down towards the per-example gradient norms
    result = trainer.validate(module, datamodule=data, verbose=False)[0]
    assert result["val/acc"] > 0.3  # it learns: chance is 0.1 (and 90 noisy steps are few)
    # resume from the last checkpoint with a larger budget: the ledger continues, not restarts
    steps_before = trainer.global_step
    dp2 = DifferentialPrivacy(method="dpsgd_global_adapt", noise_multiplier=1.0, target_epsilon=5.0, z0=50.0,
                              count_noise_multiplier=10.0, delta=1e-5)
    trainer2 = _trainer([dp2], tmp_path, max_epochs=40)
    trainer2.fit(_module(lr=2.0), datamodule=DigitsDataModule(batch_size=64, seed=0),
                 ckpt_path=trainer.checkpoint_callback.last_model_path or trainer.checkpoint_callback.best_model_path)
    assert sum(dp2.ledger.steps.values()) == trainer2.global_step > steps_before
    assert dp2.epsilon() <= 5.0


def test_non_private_monitor_attaches_and_removes_its_hooks(tmp_path):
    module = _module()
    trainer = _trainer([DPFairnessMonitor(every_n_steps=2)], tmp_path, max_steps=4)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
    assert not any(hasattr(p, "grad_sample") for p in module.parameters())
    trainer.test(module, datamodule=DigitsDataModule(batch_size=32), verbose=False)
    acc = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("fair/test/acc/group_")}
    assert len(acc) == 10


# -- refusals ---------------------------------------------------------------------------------------------------
def test_batchnorm_is_refused_with_the_fix(tmp_path):
    trainer = _trainer([DifferentialPrivacy(noise_multiplier=1.0)], tmp_path, max_steps=1)
    with pytest.raises(DPConfigError, match="GroupNorm"):
        trainer.fit(_module(norm="batch"), datamodule=DigitsDataModule())


def test_dpsgd_f_without_group_labels_is_refused(tmp_path):
    class NoGroups(DigitsDataModule):
        def make_split(self, indices):
            split = super().make_split(indices)
            return TensorDictDataset(x=split.columns["x"], y=split.columns["y"])

    dp = DifferentialPrivacy(method="dpsgd_f", noise_multiplier=1.0, num_groups=10, count_noise_multiplier=8.0)
    with pytest.raises(DPConfigError, match="group labels"):
        _trainer([dp], tmp_path, max_steps=1).fit(_module(), datamodule=NoGroups())


def test_a_loader_that_is_not_poisson_is_refused(tmp_path):
    data = DigitsDataModule()
    data.setup()
    loader = DataLoader(data.splits["train"], batch_size=32, shuffle=True)  # fixed-size shuffled batches
    with pytest.raises(DPConfigError, match="Poisson"):
        _trainer([DifferentialPrivacy(noise_multiplier=1.0)], tmp_path, max_steps=1).fit(_module(), train_dataloaders=loader)


def test_fsdp_is_refused():
    # the project's strategy=fsdp is Lightning's ModelParallelStrategy (FSDP2); Lightning's FSDPStrategy needs a GPU
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=ModelParallelStrategy(), logger=False)
    with pytest.raises(DPConfigError, match="FSDP"):
        DifferentialPrivacy(noise_multiplier=1.0).check_trainer(trainer, _module())


@pytest.mark.parametrize("kwargs,match", [
    ({"poisson_sampling": False}, "Poisson"),
    ({"grad_sample_mode": "ghost"}, "ghost"),
    ({"noise_multiplier": None}, "noise_multiplier or dp.target_epsilon"),
    ({"method": "dpsgd_f"}, "num_groups"),
    ({"method": "dpsgd_global_adapt"}, "count_noise_multiplier"),
    ({"accountant": "moments"}, "accountant"),  # rdp, prv, pld and gdp are offered
])
def test_config_refusals(kwargs, match):
    with pytest.raises(DPConfigError, match=match):
        DifferentialPrivacy(**({"noise_multiplier": 1.0} | kwargs))


def test_gradient_accumulation_is_refused(tmp_path):
    trainer = _trainer([DifferentialPrivacy(noise_multiplier=1.0)], tmp_path, max_steps=1, accumulate_grad_batches=2)
    with pytest.raises(DPConfigError, match="accumulate_grad_batches"):
        trainer.fit(_module(), datamodule=DigitsDataModule())


def test_target_epsilon_alone_calibrates_sigma(tmp_path):
    dp = DifferentialPrivacy(target_epsilon=2.0, delta=1e-5)
    trainer = _trainer([dp], tmp_path, max_steps=6)
    trainer.fit(_module(), datamodule=DigitsDataModule(batch_size=64))
    q = dp.loader.sampler.sample_rate
    assert trainer.global_step == 6
    assert compute_epsilon({dp.noise_multiplier: 6}, q, 1e-5) <= 2.0
    assert math.isclose(dp.epsilon(), compute_epsilon({dp.noise_multiplier: 6}, q, 1e-5))


# -- the fairness monitor's full-data measurements on a real private run -------------------------------------------
class _Recorder(L.pytorch.loggers.Logger):
    """Keeps every logged metric by step (a real Lightning logger, in memory)."""

    def __init__(self) -> None:
        super().__init__()
        self.history: dict[int, dict[str, float]] = {}

    name, version = "recorder", 0

    @property
    def experiment(self):
        return None

    def log_metrics(self, metrics, step=None):
        self.history.setdefault(step, {}).update({k: float(v) for k, v in metrics.items()})

    def log_hyperparams(self, params, *args, **kwargs):
        pass


@pytest.mark.parametrize("method,kwargs", [
    ("dpsgd", {"max_grad_norm": 0.1}),
    # Z far above every per-example norm and pinned there (eta_Z = 0, no count above gamma Z): f_i = C0 / Z for all
    ("dpsgd_global_adapt", {"max_grad_norm": 0.1, "z0": 1e4, "z_lr": 0.0, "z_threshold": 1e6, "count_noise_multiplier": 10.0}),
])
def test_monitor_measures_against_the_full_data_gradient(tmp_path, method, kwargs):
    from lightning_modules.nn.cnn import TanhCNN
    from lightning_modules.privacy.decomposition import gradient, mean_loss_fn

    torch.manual_seed(0)
    data = DigitsDataModule(batch_size=64, val_fraction=0.1, test_fraction=0.3, downsample={8: 0.2})
    module = Classifier(TanhCNN(), num_classes=10, optimizer=lambda p: torch.optim.SGD(p, lr=1.0))
    theta0 = {f"net.{k}": v.detach().clone() for k, v in module.net.named_parameters()}
    dp = DifferentialPrivacy(method=method, noise_multiplier=1.0, delta=1e-5, **kwargs)
    monitor = DPFairnessMonitor(every_n_steps=3, max_grad_norm=0.1, hutchinson_probes=10)
    recorder = _Recorder()
    _trainer([dp, monitor], tmp_path, max_steps=4, logger=recorder).fit(module, datamodule=data)
    # the monitor's steps (global_step 0 and 3 at batch start) are logged after the optimizer step, at 1 and 4
    monitored = [step for step in sorted(recorder.history) if "fair/rho" in recorder.history[step]]
    assert monitored == [1, 4]
    step0 = recorder.history[1]  # measured at theta_0
    # g_D8 at theta_0 over ALL training eights, computed here independently of the monitor
    data.setup()
    train = data.splits["train"].columns
    eights = train["y"] == 8
    g8 = gradient(mean_loss_fn(module, train["x"][eights], train["y"][eights]), theta0)
    assert step0["fair/norm_gDk/group_8"] == pytest.approx(float(g8.norm()), rel=1e-4)
    for k in (8, 2):
        r = {name: step0[f"fair/{name}/group_{k}"] for name in
             ("R_dir_inner", "R_dir_hess", "R_mag_inner", "R_mag_hess", "R_dir", "R_mag", "R_clip", "R_noise", "trace_H")}
        assert r["R_dir"] == pytest.approx(r["R_dir_inner"] + r["R_dir_hess"])
        assert r["R_clip"] == pytest.approx(r["R_dir"] + r["R_mag"])
        assert r["R_noise"] > 0 and r["trace_H"] > 0
    if method == "dpsgd_global_adapt":  # every example scaled alike: no direction error, R_dir = 0
        assert abs(step0["fair/direction_error/group_8"]) < 1e-5 and abs(step0["fair/R_dir/group_8"]) < 1e-9
        assert step0["fair/rho"] == pytest.approx(0.1 / 1e4, rel=1e-4)
        assert step0["fair/clip_fraction/group_8"] == 0.0 and step0["fair/frac_above_gamma_Z"] == 0.0
    else:  # C0 = 0.1 clips: the clipped batch update is shorter and turned (at initialisation, not yet against 8 in
        # particular: that shows over training, tests/privacy/test_runs.py::test_noise_free_clipping_ablation...)
        assert step0["fair/rho"] < 1 and abs(step0["fair/direction_error/group_8"]) > 1e-4
    for k in (8, 2):
        assert step0[f"fair/direction_error/group_{k}"] == pytest.approx(
            step0[f"fair/cos_gDk_gB/group_{k}"] - step0[f"fair/cos_gDk_gbarB/group_{k}"], abs=1e-6)
