"""MediaLogger: mp4s and frame grids of a module's media_samples() land in a real MLflow store."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import MLFlowLogger
from mlflow.tracking import MlflowClient
from torch.utils.data import DataLoader, Dataset

from callbacks.media import MediaLogger, frame_grid
from datamodules.media import decode_image, decode_video

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


class Clips(Dataset):
    """Moving bright squares, 6 frames of 16x24, as batch dicts with "video" and "fps"."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict:
        video = -torch.ones(3, 6, 16, 24)
        for t in range(6):
            video[:, t, 4:10, 2 + 3 * t : 8 + 3 * t] = 1.0
        return {"video": video, "fps": torch.tensor(6.0)}


class Smoother(L.LightningModule):
    """A one-layer video model that offers media: the input and its output side by side."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(3, 3, 3, padding=1)
        self.modes: list[bool] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return (self.conv(batch["video"]) - batch["video"]).pow(2).mean()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val/loss", (self.conv(batch["video"]) - batch["video"]).pow(2).mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def media_samples(self, batch: dict) -> dict[str, torch.Tensor]:
        self.modes.append(self.training)
        x = batch["video"]
        return {"pair": torch.cat([x, self.conv(x).clamp(-1, 1)], dim=-1)}


def test_frame_grid_layout() -> None:
    video = torch.arange(2 * 5, dtype=torch.float32).view(2, 1, 5, 1, 1).expand(2, 3, 5, 2, 3)
    grid = frame_grid(video, grid_frames=3)
    assert grid.shape == (3, 2 * 2, 3 * 3)
    # row b, column j holds frame round(j * (T-1) / 2) of clip b: frames 0, 2, 4
    assert grid[0, 0, ::3].tolist() == [0.0, 2.0, 4.0] and grid[0, 2, ::3].tolist() == [5.0, 7.0, 9.0]


def test_media_logged_to_mlflow(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    logger = MLFlowLogger(experiment_name="media", tracking_uri=uri, artifact_location=str(tmp_path / "artifacts"))
    callback = MediaLogger(every_n_steps=2, on_validation=True, max_samples=2, grid_frames=4, output_dir=str(tmp_path / "media"))
    module = Smoother()
    loader = DataLoader(Clips(), batch_size=4)
    trainer = L.Trainer(max_steps=4, logger=logger, callbacks=[callback], accelerator="cpu", enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, check_val_every_n_epoch=2,
                        num_sanity_val_steps=1, limit_val_batches=1)
    trainer.fit(module, loader, loader)

    client = MlflowClient(uri)
    steps = sorted(a.path for a in client.list_artifacts(logger.run_id, "media"))
    # training at steps 2 and 4, validation after epoch 2 (step 4: same folder); none for the sanity check
    assert steps == ["media/step_000002", "media/step_000004"]
    files = sorted(a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(logger.run_id, "media/step_000002"))
    assert files == ["pair.png", "pair_0.mp4", "pair_1.mp4"]
    assert all(mode is False for mode in module.modes) and module.training  # eval inside, train mode restored

    local = Path(client.download_artifacts(logger.run_id, "media/step_000002"))
    clip = decode_video((local / "pair_0.mp4").read_bytes())
    assert clip.frames.shape == (6, 16, 48, 3) and clip.fps == pytest.approx(6.0)
    # the bright square of frame 5 is at columns 17..22 of the input half
    assert clip.frames[5, 7, 18:22].mean() > 200 and clip.frames[5, 7, 2:6].mean() < 60
    grid = decode_image((local / "pair.png").read_bytes())
    assert grid.shape == (2 * 16, 4 * 48, 3)


def test_rejects_bad_media(tmp_path: Path) -> None:
    class Flat(Smoother):
        def media_samples(self, batch: dict) -> dict[str, torch.Tensor]:
            return {"flat": batch["video"][:, :, 0]}

    trainer = L.Trainer(max_steps=1, logger=False, accelerator="cpu", enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[MediaLogger(every_n_steps=1, on_validation=False, output_dir=str(tmp_path))])
    with pytest.raises(ValueError, match=r"media_samples\(\)\['flat'\] must be \[B, 3, T, H, W\]"):
        trainer.fit(Flat(), DataLoader(Clips(), batch_size=2))
