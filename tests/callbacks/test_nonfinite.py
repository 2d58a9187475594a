"""A NaN in the data makes the loss non-finite: stop with a message naming the step, keeping the last good
checkpoint, or skip that one step and train on."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from callbacks.nonfinite import NonFiniteLossError, NonFiniteLossGuard
from datamodules.digits import DigitsDataModule
from lightning_modules.classifier import Classifier
from lightning_modules.nn.cnn import SmallCNN

BATCH = 32
POISONED_BATCH = 3


def poisoned_loader() -> DataLoader:
    data = DigitsDataModule()
    data.setup()
    train = data.splits["train"]
    train.columns["x"] = train.columns["x"].clone()
    train.columns["x"][POISONED_BATCH * BATCH] = float("nan")  # one corrupt image in batch 3
    return DataLoader(train, batch_size=BATCH, shuffle=False)


def make_trainer(policy: str, ckpt_dir: Path) -> tuple[L.Trainer, NonFiniteLossGuard]:
    guard = NonFiniteLossGuard(policy)
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_top_k=-1, filename="{step}")
    trainer = L.Trainer(accelerator="cpu", max_steps=6, logger=False, enable_progress_bar=False,
                        callbacks=[guard, checkpoint], enable_model_summary=False)
    return trainer, guard


def make_model() -> Classifier:
    torch.manual_seed(0)
    return Classifier(SmallCNN(width=8), num_classes=10, optimizer=partial(torch.optim.SGD, lr=0.1))


def test_stop_names_the_step_and_keeps_good_checkpoints(tmp_path: Path) -> None:
    trainer, _ = make_trainer("stop", tmp_path)
    model = make_model()
    with pytest.raises(NonFiniteLossError, match=f"global step {POISONED_BATCH}, batch {POISONED_BATCH}"):
        trainer.fit(model, train_dataloaders=poisoned_loader())
    saved = sorted(tmp_path.glob("*.ckpt"))
    assert [p.name for p in saved] == [f"step={s}.ckpt" for s in range(1, POISONED_BATCH + 1)]
    last_good = torch.load(saved[-1], weights_only=True)["state_dict"]
    assert all(torch.isfinite(t).all() for t in last_good.values())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_skip_drops_the_step_and_trains_on(tmp_path: Path) -> None:
    trainer, guard = make_trainer("skip", tmp_path)
    model = make_model()
    trainer.fit(model, train_dataloaders=poisoned_loader())
    assert guard.skipped == 1
    assert trainer.global_step == 6
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_unknown_policy_is_named() -> None:
    with pytest.raises(ValueError, match="policy='ignore'"):
        NonFiniteLossGuard("ignore")
