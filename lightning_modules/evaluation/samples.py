"""Writes the first `count` samples of an evaluation as mp4 (png for images) with the prompt beside each as
.txt, under `<output_dir or run dir>/samples`, and logs them to MLflow under `samples/`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from datamodules.media import write_image, write_video
from lightning_modules.evaluation.base import Evaluator


def slug(text: str, length: int = 40) -> str:
    """A file-name-safe form of a prompt."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:length] or "empty"


def write_clip(stem: Path, video: torch.Tensor, caption: str, fps: float) -> list[Path]:
    """`video` [3, T, H, W] → <stem>.mp4 (or .png for one frame) and <stem>.txt (the caption)."""
    if video.shape[1] == 1:
        media = write_image(stem.with_suffix(".png"), video[:, 0].cpu())
    else:
        media = write_video(stem.with_suffix(".mp4"), video.cpu(), fps=fps if fps > 0 else 8.0)
    stem.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
    return [media, stem.with_suffix(".txt")]


def log_artifacts(trainer: Any, files: list[Path], artifact_path: str) -> None:
    """Log files to every MLflow logger of the trainer."""
    for logger in trainer.loggers if trainer is not None else []:
        if hasattr(logger, "run_id") and hasattr(logger.experiment, "log_artifact"):
            for path in files:
                logger.experiment.log_artifact(logger.run_id, str(path), artifact_path=artifact_path)


class SampleWriter(Evaluator):
    """See the module docstring. Args: count (clips written at most), output_dir (default <run dir>/samples)."""

    def __init__(self, count: int = 8, output_dir: str | None = None) -> None:
        self.count, self.output_dir = int(count), output_dir
        self.written: list[Path] = []
        self.trainer: Any = None

    def start(self, module: Any, trainer: Any) -> None:
        self.trainer, self.written = trainer, []

    def update(self, generated: torch.Tensor, batch: dict[str, Any], extras: dict[str, torch.Tensor]) -> None:
        left = self.count - len(self.written) // 2
        if left <= 0 or self.trainer is None or not self.trainer.is_global_zero:
            return
        folder = Path(self.output_dir or Path(self.trainer.default_root_dir) / "samples")
        fps = batch.get("fps")
        rates = torch.as_tensor(fps if fps is not None else 0.0).flatten().expand(generated.shape[0]).tolist()
        files: list[Path] = []
        for video, caption, rate in list(zip(generated, batch["text"], rates))[:left]:
            index = len(self.written) // 2 + len(files) // 2
            files += write_clip(folder / f"{index:03d}_{slug(caption)}", video, caption, rate)
        self.written += files
        log_artifacts(self.trainer, files, "samples")
