"""Log a module's videos (mp4) and frame grids (png) to MLflow, every N training steps and after validation.

Protocol (what a LightningModule offers to be logged):

    pl_module.media_samples(batch) -> dict[str, Tensor]     # name -> video [B, 3, T, H, W] in [-1, 1]
                                                            #   or audio [B, C, S] in [-1, 1]

`batch` is a training batch (every `every_n_steps` optimizer steps) or the first batch of the first validation
dataloader (at the end of each validation, not during the sanity check). The callback calls it under
`torch.no_grad()` with the module in eval mode (then restores the mode) on every rank, since a sharded model
needs all ranks in its forward; only global rank 0 writes files and logs them. Optional: a module attribute
`media_fps` (float), else the batch's "fps" (first entry), else the callback's `fps`.

For each name it writes, under `<output_dir>/step_<step:06d>/` (default output_dir: `<trainer.default_root_dir>/
media`), `<name>_<i>.mp4` per sample (H.264 via `datamodules.media.write_video`) and `<name>.png`: a grid with
one row per sample and `grid_frames` evenly spaced frames per row (`datamodules.media.write_image`). Audio
gives `<name>_<i>.wav` per sample and `<name>.png`, its spectrograms one row per sample
(`lightning_modules.evaluation.audio.spectrogram_image`), at the module's `media_sample_rate` or the batch's
"sample_rate". Each file
goes to every MLflow logger of the trainer with
`logger.experiment.log_artifact(logger.run_id, path, artifact_path=f"media/step_{step:06d}")`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from einops import rearrange
from lightning.pytorch.callbacks import Callback

from datamodules.media import write_audio, write_image, write_video
from lightning_modules.evaluation.audio import spectrogram_image


def frame_grid(video: torch.Tensor, grid_frames: int = 8) -> torch.Tensor:
    """`[B, 3, T, H, W]` → `[3, B·H, n·W]`: row b holds n = min(grid_frames, T) evenly spaced frames of clip b."""
    t = video.shape[2]
    n = min(grid_frames, t)
    index = torch.linspace(0, t - 1, n).round().long()
    return rearrange(video[:, :, index], "b c n h w -> c (b h) (n w)")


class MediaLogger(Callback):
    """See the module docstring.

    Args:
        every_n_steps: log on the training batch every that many optimizer steps (None or 0: never).
        on_validation: log on the first validation batch at the end of every validation.
        max_samples: clips per name at most.
        fps: frame rate of the mp4s when neither the module nor the batch gives one.
        grid_frames: frames per row of the png grid.
        output_dir: where files are written (default `<trainer.default_root_dir>/media`).
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        on_validation: bool = True,
        max_samples: int = 4,
        fps: float = 8.0,
        grid_frames: int = 8,
        output_dir: str | None = None,
    ) -> None:
        if every_n_steps is not None and every_n_steps < 0:
            raise ValueError(f"callbacks.media.every_n_steps={every_n_steps} must be >= 0 or null")
        self.every_n_steps, self.on_validation = every_n_steps, on_validation
        self.max_samples, self.fps, self.grid_frames = max_samples, fps, grid_frames
        self.output_dir = output_dir
        self._val_batch: Any = None
        self._last_step = -1
        self.logged: list[Path] = []

    # -- hooks -------------------------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if not self.every_n_steps or step == 0 or step % self.every_n_steps or step == self._last_step:
            return
        self._last_step = step
        self.log_media(trainer, pl_module, batch)

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self.on_validation and batch_idx == 0 and dataloader_idx == 0 and not trainer.sanity_checking:
            self._val_batch = batch

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._val_batch is not None:
            batch, self._val_batch = self._val_batch, None
            self.log_media(trainer, pl_module, batch)

    # -- logging -------------------------------------------------------------------------------------------------------
    def log_media(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any) -> list[Path]:
        """Ask the module for its media on `batch`, write them and log them (rank 0); returns the files written."""
        if not hasattr(pl_module, "media_samples"):
            raise TypeError(f"MediaLogger: {type(pl_module).__name__} has no media_samples(batch) method")
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad():
                media = pl_module.media_samples(batch)
        finally:
            pl_module.train(was_training)
        if not trainer.is_global_zero:
            return []
        step = trainer.global_step
        folder = Path(self.output_dir or Path(trainer.default_root_dir) / "media") / f"step_{step:06d}"
        fps = self._fps(pl_module, batch)
        written = []
        for name, video in media.items():
            if video.ndim == 3:  # audio [B, C, S]
                written += self._write_audio(folder, name, video, pl_module, batch)
                continue
            if video.ndim != 5 or video.shape[1] != 3:
                raise ValueError(f"media_samples()[{name!r}] must be [B, 3, T, H, W], got {tuple(video.shape)}")
            video = video[: self.max_samples].detach().float().cpu().clamp(-1.0, 1.0)
            for i, clip in enumerate(video):
                written.append(write_video(folder / f"{name}_{i}.mp4", clip, fps=fps))
            written.append(write_image(folder / f"{name}.png", frame_grid(video, self.grid_frames)))
        for logger in trainer.loggers:
            if hasattr(logger, "run_id") and hasattr(logger.experiment, "log_artifact"):
                for path in written:
                    logger.experiment.log_artifact(logger.run_id, str(path), artifact_path=f"media/step_{step:06d}")
        self.logged += written
        return written

    def _write_audio(self, folder: Path, name: str, audio: torch.Tensor, pl_module: L.LightningModule,
                     batch: Any) -> list[Path]:
        rate = getattr(pl_module, "media_sample_rate", None) or (batch.get("sample_rate") if isinstance(batch, dict)
                                                                 else None)
        if not rate:
            raise ValueError(f"media_samples()[{name!r}] is audio: the module needs `media_sample_rate` or the batch "
                             "a 'sample_rate'")
        audio = audio[: self.max_samples].detach().float().cpu().clamp(-1.0, 1.0)
        written = [write_audio(folder / f"{name}_{i}.wav", clip, int(rate)) for i, clip in enumerate(audio)]
        return [*written, write_image(folder / f"{name}.png", spectrogram_image(audio))]

    def _fps(self, pl_module: L.LightningModule, batch: Any) -> float:
        if getattr(pl_module, "media_fps", None):
            return float(pl_module.media_fps)
        if isinstance(batch, dict) and "fps" in batch:
            fps = batch["fps"]
            value = float(fps[0]) if isinstance(fps, torch.Tensor | list | tuple) else float(fps)
            if value > 0:
                return value
        return self.fps
