"""Movie Gen Audio (arXiv 2410.13720 §6) on the generation core: one flow-matching DiT over audio latents does
video-to-audio (V2A), text+video-to-audio (TV2A) and text-to-audio (T2A), and extends or infills audio.

It is `GenerationModule` (training step, sampler, guidance, windows, evaluators, checkpoints) whose data is audio:

    X_1          = (AudioCodec.encode(audio) − mean) / std     [B, C, T, 1, 1]: one token per latent frame (DiT
                                                                patch (1, 1, 1)), T = ceil(S / hop)
    conditioners text (cross-attention), video (`conditioning.audio.VideoFrameFeatures`: features of the frame on
                 screen, added per latent frame), context (`conditioning.audio.AudioContext`: masked latent + mask
                 on the channels); each with its own dropout: text and video dropped independently give the
                 V2A / TV2A / T2A tasks (and the unconditional branch of guidance)
    long audio   `sampler.window` latent frames with `sampler.weighting: triangular` (MultiDiffusion over time,
                 `generative.multidiffusion`): a clip longer than the model's window is generated in overlapping
                 windows fused with triangular weights at every solver step

Batches: "audio" [B, c, S] in [-1, 1], "sample_rate", "text", and for video conditioning "video" [B, 3, T, H, W]
with "fps" (`datamodules.video.AudioVideoDataModule`); "meta" (the world's events) for the sync evaluator.
`generate(batch, S, 1, 1)` returns audio [B, c, S]. Media: "sample" and "real" wavs with spectrograms.

`task=sample`: `model.sample.inputs` (a video file or folder: mp4s without sound, or generated ones) → the same
mp4 with a generated soundtrack muxed in (PyAV); `model.sample.prompts` (one a line) → wavs of
`text_duration` seconds.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch

from datamodules.media import write_audio, write_video
from lightning_modules.conditioning.audio import VideoFrameFeatures
from lightning_modules.evaluation.samples import log_artifacts, slug
from lightning_modules.generation import GenerationModule, read_inputs


class AudioGenerationModule(GenerationModule):
    """See the module docstring; the arguments are `GenerationModule`'s (the codec an `nn.audio_ae.AudioCodec`),
    plus `text_duration`: seconds of audio for a text prompt in `task=sample`."""

    def __init__(self, *args: Any, text_duration: float = 2.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not hasattr(self.codec, "frame_rate"):
            raise ValueError(f"model.codec must be an audio codec (nn.audio_ae.AudioCodec), got {type(self.codec).__name__}")
        for name, c in self.conditioners.items():
            if isinstance(c, VideoFrameFeatures) and abs(c.latent_rate - self.codec.frame_rate) > 1e-6:
                raise ValueError(f"model.conditioners.{name}.latent_rate={c.latent_rate} must equal the codec's latent "
                                 f"rate sample_rate / hop = {self.codec.frame_rate}")
        if text_duration <= 0:
            raise ValueError(f"model.text_duration={text_duration} must be > 0 seconds")
        self.text_duration = float(text_duration)
        self.media_sample_rate = self.codec.sample_rate

    # -- latents -----------------------------------------------------------------------------------------------------
    def encode(self, audio: torch.Tensor) -> torch.Tensor:
        """Normalised latent (Enc(x) − mean) / std [B, C, T, 1, 1] of audio [B, c, S]."""
        with torch.no_grad():
            return (self.codec.encode(audio.float()) - self.latent_mean) / self.latent_std

    def to_latent(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.encode(self._audio(batch))

    def _audio(self, batch: dict[str, Any]) -> torch.Tensor:
        rate = int(batch.get("sample_rate") or self.codec.sample_rate)
        if rate != self.codec.sample_rate:
            raise ValueError(f"the batch's audio is at {rate} Hz, the codec's at {self.codec.sample_rate} Hz "
                             "(data.sample_rate must equal model.codec.sample_rate)")
        return batch["audio"]

    def from_latent(self, x1: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        """Audio [B, c, S] in [-1, 1] (S = num_frames samples) from a normalised latent."""
        return self.codec.decode(x1 * self.latent_std + self.latent_mean, num_frames).clamp(-1.0, 1.0)

    def pixel_shape(self, batch: dict[str, Any]) -> tuple[int, int, int]:
        """(S, 1, 1): samples of the batch's audio, else of its video's duration (T / fps seconds)."""
        if batch.get("audio") is not None:
            return int(batch["audio"].shape[-1]), 1, 1
        if batch.get("video") is not None:
            fps = float(torch.as_tensor(batch["fps"]).flatten()[0])
            return round(batch["video"].shape[2] / fps * self.codec.sample_rate), 1, 1
        return round(self.text_duration * self.codec.sample_rate), 1, 1

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch, train=True)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["text"]))
        return loss

    # -- media and evaluation ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def media_samples(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """{"sample": generated audio [B, c, S] for the batch's conditions, "real": its audio}."""
        sample, part = self._sample_batch(batch, self.media.max_samples, steps=self.media.steps)
        return {"sample": sample, "real": part["audio"].float()}

    def previews(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {}

    # -- task=sample ---------------------------------------------------------------------------------------------------
    def sample_requests(self) -> list[dict[str, Any]]:
        """Each prompt (× per_prompt) → {"text"}; each input video → {"video", "fps", "text", "name"}."""
        cfg = self.sample_cfg
        requests = [{"text": r["text"]} for r in super().sample_requests() if "source" not in r and "image" not in r] \
            if cfg.prompts else []
        if cfg.inputs:
            for r in read_inputs(cfg.inputs, cfg.fps):
                if "source" not in r:
                    raise ValueError(f"model.sample.inputs={cfg.inputs}: {r['name']} is an image; give videos")
                requests.append({"text": r["text"], "name": r["name"], "video": r["source"], "fps": r["fps"]})
        if not requests:
            raise ValueError("task=sample needs model.sample.prompts=<a text file, one prompt per line> and/or "
                             "model.sample.inputs=<a video file or a folder of videos>")
        return requests

    @torch.no_grad()
    def sample_to_files(self, trainer: L.Trainer) -> list[Path]:
        """A wav per prompt, an mp4 with the generated soundtrack per input video, under `sample.output_dir`
        (default <run dir>/samples); logged to MLflow."""
        cfg = self.sample_cfg
        self.to(trainer.strategy.root_device).eval()
        folder = Path(cfg.output_dir) if cfg.output_dir else Path(trainer.default_root_dir) / "samples"
        requests = self.sample_requests()
        written: list[Path] = []
        rate = self.codec.sample_rate
        for index, request in enumerate(requests):
            samples = self.pixel_shape(request)[0]
            audio = self.generate(request, samples, 1, 1, seed=self.sampler.seed + index)[0].cpu()
            caption = request["text"][0]
            stem = folder / f"{index:03d}_{slug(request.get('name') or caption)}"
            if "video" in request:
                written.append(write_video(stem.with_suffix(".mp4"), request["video"][0], float(request["fps"][0]),
                                           audio=audio, sample_rate=rate))
            else:
                written.append(write_audio(stem.with_suffix(".wav"), audio, rate))
            stem.parent.mkdir(parents=True, exist_ok=True)
            stem.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
            written.append(stem.with_suffix(".txt"))
            print(f"[audio] {index + 1}/{len(requests)} sampled: {written[-2].name}")
        log_artifacts(trainer, written, "samples")
        for logger in trainer.loggers:
            if hasattr(logger, "run_id") and hasattr(logger.experiment, "log_dict"):
                logger.experiment.log_dict(logger.run_id, asdict(self.sampler), "samples/sampling.json")
        print(f"[audio] wrote {len(requests)} samples to {folder}")
        return written
