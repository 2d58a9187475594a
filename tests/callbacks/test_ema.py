"""The EMA callback: the update rule by hand, EMA weights in validation (training weights restored after), the
checkpoint (training weights in state_dict, EMA in the callback state), resume, `load_ema_weights`, and a
two-process FSDP2 run whose sharded checkpoint holds the full EMA."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks.ema import EMA, load_ema_weights, read_ema_state
from lightning_modules.base import BaseModule
from lightning_modules.checkpoint_io import EMA_FORMAT
from tests.helpers import run_cli


class Regression(BaseModule):
    def __init__(self) -> None:
        super().__init__(partial(torch.optim.SGD, lr=0.1))
        torch.manual_seed(0)
        self.net = nn.Linear(3, 1)
        self.frozen = nn.Linear(3, 1).requires_grad_(False)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return (self.net(x) - y).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", (self.net(x) - y).pow(2).mean())

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test/loss", (self.net(x) - y).pow(2).mean())


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=g)
    return DataLoader(TensorDataset(x, x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.3), batch_size=8)


def fit(model: Regression, callbacks: list[Callback], max_steps: int, root: Path, ckpt_path: str | None = None,
        **kwargs) -> L.Trainer:
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks,
                        default_root_dir=str(root), **kwargs)
    trainer.fit(model, loader(), loader(), ckpt_path=ckpt_path)
    return trainer


class Recorder(Callback):
    """Records the weights after every step and the weights seen by validation and by the test loop."""

    def __init__(self) -> None:
        self.after_step: list[torch.Tensor] = []
        self.in_validation: list[torch.Tensor] = []
        self.in_test: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after_step.append(pl_module.net.weight.detach().clone())

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0:
            self.in_validation.append(pl_module.net.weight.detach().clone())

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0:
            self.in_test.append(pl_module.net.weight.detach().clone())


def test_update_rule_by_hand_and_validation_uses_the_ema(tmp_path: Path) -> None:
    model = Regression()
    start = model.net.weight.detach().clone()
    # decay 0.8, not 0.5: at 0.5 a rule with d and 1 − d swapped gives the same average
    recorder, ema = Recorder(), EMA(decay=0.8, warmup=False)
    # the recorder runs first, so it sees the weights after each step; validation after 4 steps
    fit(model, [recorder, ema], 4, tmp_path, val_check_interval=4, enable_checkpointing=False)
    expected = start
    for w in recorder.after_step:
        expected = 0.8 * expected + 0.2 * w  # θ̄ ← d·θ̄ + (1 − d)·θ
    assert ema.num_updates == 4
    assert torch.allclose(ema.shadow["net.weight"], expected, atol=1e-6)
    assert torch.allclose(recorder.in_validation[0], expected, atol=1e-6), "validation runs with the EMA"
    assert torch.equal(model.net.weight, recorder.after_step[-1]), "training weights are restored"
    assert "frozen.weight" not in ema.shadow
    warm = EMA(decay=0.999)
    assert [warm.current_decay() for _ in range(1)] == [pytest.approx(1 / 10)]
    warm.num_updates = 90
    assert warm.current_decay() == pytest.approx(91 / 100)


def test_checkpoint_resume_and_loading_for_sampling(tmp_path: Path) -> None:
    model = Regression()
    ema = EMA(decay=0.9)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=3)
    fit(model, [ema, checkpoint], 6, tmp_path, val_check_interval=3)
    last = tmp_path / "ckpt" / "last.ckpt"
    state = torch.load(last, weights_only=True)
    assert torch.equal(state["state_dict"]["net.weight"], model.net.weight), "state_dict holds the training weights"
    stored = read_ema_state(last)
    assert stored["num_updates"] == 6 and torch.equal(stored["shadow"]["net.weight"], ema.shadow["net.weight"])

    resumed = EMA(decay=0.9)
    fit(Regression(), [resumed], 8, tmp_path / "resume", ckpt_path=str(last), limit_val_batches=0)
    assert resumed.num_updates == 8, "the EMA continued from the checkpoint"

    fresh = Regression()
    assert load_ema_weights(fresh, last)
    assert torch.equal(fresh.net.weight, stored["shadow"]["net.weight"])
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": state["state_dict"], "callbacks": {}}, plain)
    assert not load_ema_weights(Regression(), plain)


def test_decay_bounds_and_defaults() -> None:
    assert EMA(decay=0.0, warmup=False).current_decay() == 0.0  # d = 0 is allowed: the EMA is the weights
    for decay in (1.0, -0.1):  # d = 1 would never move
        with pytest.raises(ValueError, match="must be in"):
            EMA(decay=decay)
    with pytest.raises(ValueError, match="every_n_steps"):
        EMA(every_n_steps=0)
    default = EMA()  # the documented default d = 0.999, reached once the warmup's (1 + n) / (10 + n) exceeds it
    default.num_updates = 10**5
    assert default.warmup and default.current_decay() == 0.999


def test_start_step_and_every_n_steps_by_hand(tmp_path: Path) -> None:
    """Before start_step the EMA tracks the weights; from it, one update every every_n_steps optimizer steps
    (global steps 1, 2, ... after each optimizer step): here updates at steps 2, 4 and 6."""
    recorder, ema = Recorder(), EMA(decay=0.8, warmup=False, start_step=2, every_n_steps=2)
    fit(Regression(), [recorder, ema], 6, tmp_path, limit_val_batches=0, enable_checkpointing=False)
    w = recorder.after_step  # w[k - 1]: the weights after step k
    expected = w[0]  # step 1 < start_step: the EMA is the weights
    for k in (2, 4, 6):
        expected = 0.8 * expected + 0.2 * w[k - 1]
    assert ema.num_updates == 3
    assert torch.allclose(ema.shadow["net.weight"], expected, atol=1e-6)


def test_test_loop_uses_the_ema_and_validation_can_opt_out(tmp_path: Path) -> None:
    model = Regression()
    recorder, ema = Recorder(), EMA(decay=0.8, warmup=False, validate_with_ema=False)
    trainer = fit(model, [recorder, ema], 4, tmp_path, val_check_interval=4, enable_checkpointing=False)
    trained = recorder.after_step[-1]
    assert not torch.allclose(ema.shadow["net.weight"], trained, atol=1e-4)  # the two differ here
    assert torch.equal(recorder.in_validation[0], trained), "validate_with_ema=False: the training weights"
    trainer.test(model, loader(), verbose=False)
    assert torch.equal(recorder.in_test[0], ema.shadow["net.weight"]), "the test loop runs with the EMA"
    assert torch.equal(model.net.weight, trained), "training weights are restored after the test loop"


def test_state_before_the_ema_is_initialised_round_trips() -> None:
    """A checkpoint saved before the EMA has started (fresh, or loaded and not yet applied to a module) holds
    what the EMA holds: nothing yet, or the loaded state unchanged."""
    fresh = EMA().state_dict()
    assert fresh["format"] == EMA_FORMAT and fresh["shadow"] == {} and fresh["num_updates"] == 0
    model, ema = Regression(), EMA(decay=0.5, warmup=False)
    ema.initialise(model)
    ema.update(model)
    state = ema.state_dict()
    loaded = EMA(decay=0.5, warmup=False)
    loaded.load_state_dict(state)
    again = loaded.state_dict()
    assert again["num_updates"] == 1 and torch.equal(again["shadow"]["net.weight"], state["shadow"]["net.weight"])
    loaded.initialise(Regression())
    assert loaded.num_updates == 1 and torch.equal(loaded.shadow["net.weight"], state["shadow"]["net.weight"])


def test_one_update_per_optimizer_step_under_gradient_accumulation(tmp_path: Path) -> None:
    ema = EMA(decay=0.8, warmup=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = fit(Regression(), [ema, checkpoint], 3, tmp_path, accumulate_grad_batches=2, limit_val_batches=0)
    assert trainer.global_step == 3
    assert ema.num_updates == 3
    resumed = EMA(decay=0.8, warmup=False)
    trainer = fit(Regression(), [resumed], 5, tmp_path, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"),
                  accumulate_grad_batches=2, limit_val_batches=0, enable_checkpointing=False)
    assert trainer.global_step == 5
    assert resumed.num_updates == 5, "a resumed run counts its first accumulating batch as no step"


@pytest.mark.slow
def test_fsdp2_two_processes_keep_a_full_ema_in_the_sharded_checkpoint(outputs: Path, tmp_path: Path) -> None:
    """The reduced quickstart under FSDP2 on 2 CPU processes (gloo): the DCP checkpoint's metadata holds the
    full EMA tensors, which load into a plain (unsharded) module for sampling."""
    from experiments.compose import compose_config
    from tests.lightning_modules.test_generation import QUICK

    args = [*QUICK, "strategy=fsdp", "trainer.devices=2", "test_after_fit=false", f"data.data_dir={tmp_path / 'data'}",
            "strategy.parallel.activation_checkpointing=true"]
    run_cli(*args, timeout=600)
    (ckpt,) = outputs.glob("quickstart/runs/*/checkpoints/last.ckpt")
    assert ckpt.is_dir() and (ckpt / "meta.pt").is_file()
    state = read_ema_state(ckpt)
    assert state is not None and state["num_updates"] == 6
    cfg = compose_config([*args[:-3]], tmp_path / "job")
    import hydra

    module = hydra.utils.instantiate(cfg.model, _convert_="object")
    assert {n: tuple(p.shape) for n, p in EMA.tracked(module).items()} == {
        n: tuple(t.shape) for n, t in state["shadow"].items()}, "full (unsharded) EMA tensors"
    assert load_ema_weights(module, ckpt)
