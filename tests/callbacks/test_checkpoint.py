"""The project's checkpoint callback: the end of training is saved even between validations."""

from __future__ import annotations

from pathlib import Path

import torch

from callbacks.checkpoint import Checkpoint
from tests.callbacks.test_ema import Regression, fit


def test_a_run_that_stops_between_validations_saves_its_last_step(tmp_path: Path) -> None:
    # 8 batches an epoch, validation every 2 epochs: saved at step 16; the run stops at step 21, mid-epoch
    checkpoint = Checkpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_epochs=1)
    model = Regression()
    fit(model, [checkpoint], 21, tmp_path, check_val_every_n_epoch=2)
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 21
    saved = {k.removeprefix("net."): v for k, v in last["state_dict"].items() if k.startswith("net.")}
    assert all(torch.equal(saved[k], v) for k, v in model.net.state_dict().items()), "the final weights"
    assert (tmp_path / "ckpt" / "last.ckpt").is_symlink()
    # a run that ends on a save is not saved twice
    again = Checkpoint(dirpath=tmp_path / "again", filename="{step}", every_n_epochs=1)
    fit(Regression(), [again], 16, tmp_path, check_val_every_n_epoch=2)
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == ["last.ckpt", "step=16.ckpt"]
