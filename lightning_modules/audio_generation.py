"""Movie Gen Audio (arXiv 2410.13720 §6) on the generation core: one flow-matching DiT over audio latents does
video-to-audio (V2A), text+video-to-audio (TV2A) and text-to-audio (T2A), and extends or infills audio.

It is `GenerationModule` (training step, sampler, guidance, windows, evaluators, checkpoints) whose data is audio:

    X_1          = (AudioCodec.encode(audio) − mean) / std     [B, C, T, 1, 1]: one token per latent frame (DiT
                                                                patch (1, 1, 1)), T = ceil(S / hop)
    conditioners text (cross-attention), video (`conditioning.audio.VideoFrameFeatures`: features of the frame on
                 screen, added per latent frame), context (`conditioning.audio.AudioContext`: masked latent + mask
                 on the channels); each with its own dropout: text and video dropped independently give the
                 V2A / TV2A / T2A tasks (and the unconditional branch of guidance)
    long audio   a clip longer than `sampler.window` latent frames, by `long_audio`:
                 windows (default): overlapping windows fused with `sampler.weighting` (triangular: the paper's) at
                   every solver step (MultiDiffusion over time, `generative.multidiffusion`);
                 extend: segment by segment (the paper's segment-level alternative), over the same spans
                   [s_k, e_k) (stride window − overlap, the last one aligned to the end): segment k is solved with
                   the frames already generated, [s_k, e_{k−1}), as its prefix context (m = 1 there, at least
                   `overlap` frames), and only its new frames [e_{k−1}, e_k) are kept
    known audio  a request's context ("context_audio" [B, c, S] or "context_latent", and "context_mask" [B, T], 1 =
                 given) is kept exactly in the output's latent: X = m ⊙ X_given + (1 − m) ⊙ X_generated (so in the
                 waveform to within the codec's error)

Batches: "audio" [B, c, S] in [-1, 1], "sample_rate", "text", and for video conditioning "video" [B, 3, T, H, W]
with "fps" (`datamodules.video.AudioVideoDataModule`); "meta" (the world's events) for the sync evaluator.
`generate(batch, S, 1, 1)` returns audio [B, c, S]. Media: "sample" and "real" wavs with spectrograms.

`task=sample`: `model.sample.inputs` (a video file or folder: mp4s without sound, or generated ones) → the same
mp4 with a generated soundtrack muxed in (PyAV); `model.sample.prompts` (one a line) → wavs of
`text_duration` seconds. With `model.sample.context_audio=<wav>` (`AudioSampleConfig`) every request starts from
that audio: `context_mode=extend` continues it for `text_duration` seconds (a prompt) or to the video's end (an
input video); `context_mode=infill` regenerates the gap `context_span=[start_s, end_s]` inside it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from einops import rearrange

from datamodules.media import decode_audio, probe_audio, write_audio, write_video
from lightning_modules.conditioning.audio import AudioContext, VideoFrameFeatures
from lightning_modules.conditioning.contact import ContactConfig, contact_encoder_from_datamodule
from lightning_modules.evaluation.samples import log_artifacts, slug
from lightning_modules.generation import GenerationModule, SampleTaskConfig, read_inputs
from lightning_modules.generative import multidiffusion

LONG_AUDIO = ("windows", "extend")
CONTEXT_MODES = ("extend", "infill")


@dataclass
class AudioSampleConfig(SampleTaskConfig):
    """`SampleTaskConfig` plus a given audio every request starts from: `context_audio` (a wav or any file with
    an audio stream, resampled to the codec's rate), `context_mode` (extend | infill) and, for infill,
    `context_span` = [start_s, end_s], the gap to regenerate."""

    context_audio: str | None = None
    context_mode: str = "extend"
    context_span: list[float] | None = None

    def __post_init__(self) -> None:
        if self.context_mode not in CONTEXT_MODES:
            raise ValueError(f"model.sample.context_mode={self.context_mode!r}; choose one of {CONTEXT_MODES}")
        if self.context_span is not None:
            span = [float(x) for x in self.context_span]
            if self.context_mode != "infill" or len(span) != 2 or not 0.0 <= span[0] < span[1]:
                raise ValueError(f"model.sample.context_span={list(self.context_span)} must be [start_s, end_s] "
                                 "with 0 <= start_s < end_s, for context_mode=infill")
            self.context_span = span
        elif self.context_mode == "infill" and self.context_audio:
            raise ValueError("model.sample.context_mode=infill needs model.sample.context_span=[start_s, end_s]")


def context_mask(given_samples: int, total_samples: int, hop: int, gap: tuple[int, int] | None = None) -> torch.Tensor:
    """[ceil(total_samples / hop)] mask of the latent frames that are given: m_j = 1 when frame j's samples
    [j·hop, (j + 1)·hop) lie wholly inside the given audio [0, given_samples) and do not meet the gap [a, b)
    (samples to regenerate: j·hop < b and (j + 1)·hop > a)."""
    frames = math.ceil(total_samples / hop)
    start = torch.arange(frames) * hop
    mask = start + hop <= given_samples
    if gap is not None:
        mask &= ~((start < gap[1]) & (start + hop > gap[0]))
    return mask.float()


class AudioGenerationModule(GenerationModule):
    """See the module docstring; the arguments are `GenerationModule`'s (the codec an `nn.audio_ae.AudioCodec`),
    plus `text_duration`: seconds of audio for a text prompt in `task=sample`; `long_audio`: windows | extend,
    how a clip longer than `sampler.window` is generated."""

    sample_config_class = AudioSampleConfig

    def __init__(self, *args: Any, text_duration: float = 2.0, long_audio: str = "windows", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if long_audio not in LONG_AUDIO:
            raise ValueError(f"model.long_audio={long_audio!r}; choose one of {LONG_AUDIO}")
        self.long_audio = long_audio
        if (long_audio == "extend" or self.sample_cfg.context_audio) and not self._has_context():
            raise ValueError("model.long_audio=extend and model.sample.context_audio need an audio context "
                             "conditioner (model.conditioners.<name>: AudioContext)")
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

    def _has_context(self) -> bool:
        return any(isinstance(c, AudioContext) for c in self.conditioners.values())

    # -- long audio and given audio ----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, batch: dict[str, Any], frames: int, height: int = 1, width: int = 1, *,
                 return_latent: bool = False, span: tuple[int, int] | None = None, **kwargs: Any) -> torch.Tensor:
        """Audio [B, c, frames] for the batch's conditions (`GenerationModule.generate`'s keywords); a clip longer
        than `sampler.window` by windows or by extension (`long_audio`); the batch's given context kept
        (module docstring)."""
        if span is not None:
            return super().generate(batch, frames, height, width, return_latent=return_latent, span=span, **kwargs)
        length = self.codec.latent_shape(frames)[1]
        if self.long_audio == "extend" and self.sampler.window and length > self.sampler.window:
            latent = self.extend(batch, frames, **kwargs)
        else:
            given, known = self.given_context(batch, length)
            generated = super().generate(batch, frames, height, width, return_latent=True, **kwargs)
            latent = torch.where(rearrange(known, "b t -> b 1 t 1 1"), given, generated)
        return latent if return_latent else self.from_latent(latent, frames)

    def given_context(self, batch: dict[str, Any], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(X_given [B, C, length, 1, 1], m [B, length] bool) of the batch's "context_latent" or "context_audio"
        and "context_mask"; zeros and no frame given when it has none."""
        size = len(batch["text"])
        if batch.get("context_latent") is None and batch.get("context_audio") is None:
            return (torch.zeros(size, self.codec.latent_channels, length, 1, 1, device=self.device),
                    torch.zeros(size, length, dtype=torch.bool, device=self.device))
        given = batch.get("context_latent")
        given = self.encode(batch["context_audio"].to(self.device)) if given is None else given.to(self.device).float()
        known = torch.as_tensor(batch["context_mask"]).to(self.device).bool()
        if given.shape[2] != length or known.shape != (size, length):
            raise ValueError(f"the context has {given.shape[2]} latent frames and a mask of {tuple(known.shape)}; "
                             f"the clip has {length} latent frames")
        return given, known

    @torch.no_grad()
    def extend(self, batch: dict[str, Any], frames: int, **kwargs: Any) -> torch.Tensor:
        """The normalised latent [B, C, T, 1, 1] of a clip of `frames` samples, generated segment by segment over
        `multidiffusion.window_spans(T, window, overlap)`: segment [s, e) sees every frame already generated or
        given as context (m = 1), and keeps its own output only where m = 0. A span that is wholly given is
        skipped. `kwargs` go to `generate` (steps, seed, guidance_scales, ...): each segment's noise is the
        whole clip's cut to the segment."""
        window, overlap = self.sampler.window, self.sampler.overlap
        if not window or overlap < 1:
            raise ValueError(f"model.long_audio=extend needs model.sampler.window and an overlap >= 1 latent frame "
                             f"(the prefix a segment continues), got window={window}, overlap={overlap}")
        length = self.codec.latent_shape(frames)[1]
        latent, known = self.given_context(batch, length)
        latent, known = latent.clone(), known.clone()
        segment_batch = {k: v for k, v in batch.items() if k != "context_audio"}
        for start, end in multidiffusion.window_spans(length, window, overlap):
            if bool(known[:, start:end].all()):
                continue
            context = {**segment_batch, "context_latent": latent, "context_mask": known.float()}
            segment = super().generate(context, frames, 1, 1, span=(start, end), return_latent=True, **kwargs)
            keep = rearrange(known[:, start:end], "b t -> b 1 t 1 1")
            latent[:, :, start:end] = torch.where(keep, latent[:, :, start:end], segment)
            known[:, start:end] = True
        return latent

    def setup(self, stage: str) -> None:
        """Before fitting, a video conditioner with a contact detector gets its trained weights (trained once per
        world from its clips and their soundtracks, then cached: `conditioning.contact`); sampling and
        evaluation read them from the checkpoint."""
        super().setup(stage)
        trainer = self._trainer
        if stage != "fit" or trainer is None or getattr(trainer, "datamodule", None) is None:
            return
        for name, c in self.conditioners.items():
            if isinstance(c, VideoFrameFeatures) and c.encoder is not None:
                if trainer.fast_dev_run:
                    print(f"[audio] fast_dev_run: model.conditioners.{name}'s contact detector left untrained")
                    continue
                settings = dict(c.contact or {})
                cache_dir = settings.pop("cache_dir", None)
                encoder = contact_encoder_from_datamodule(trainer.datamodule, ContactConfig(**settings), cache_dir)
                c.encoder.load_state_dict(encoder.state_dict())

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
        if cfg.context_audio:
            audio = self.read_context_audio(cfg.context_audio)
            requests = [self.with_context(r, audio) for r in requests]
        return requests

    def read_context_audio(self, location: str) -> torch.Tensor:
        """The given audio [1, 1, S] at the codec's rate (PyAV resamples a higher rate; a lower one is an error:
        the upper band would be missing, not generated)."""
        path, rate = Path(location), self.codec.sample_rate
        if not path.is_file():
            raise FileNotFoundError(f"model.sample.context_audio={location}: no such file")
        own = probe_audio(path).sample_rate
        if own < rate:
            raise ValueError(f"model.sample.context_audio={location} is at {own} Hz, below the codec's {rate} Hz "
                             f"(model.codec.sample_rate); give audio at {rate} Hz or more")
        audio, _ = decode_audio(path, rate, channels=1)
        if audio.shape[-1] < self.codec.hop:
            raise ValueError(f"model.sample.context_audio={location} is {audio.shape[-1] / rate:.3f} s, shorter than "
                             f"one latent frame ({self.codec.hop / rate:.3f} s)")
        return audio[None]

    def with_context(self, request: dict[str, Any], audio: torch.Tensor) -> dict[str, Any]:
        """The request with the given audio [1, 1, S_g] as context: extend → the clip is S_g + text_duration
        (a prompt) or the video's length, frames wholly inside the given audio kept; infill → the clip is S_g
        (a prompt) or the video's length, the frames meeting `context_span` regenerated. "samples" is the
        clip's length, "context_audio" the given audio zero-padded to it, "context_mask" from `context_mask`."""
        cfg, rate = self.sample_cfg, self.codec.sample_rate
        given = audio.shape[-1]
        name = f"model.sample.context_audio={cfg.context_audio} ({given / rate:.2f} s)"
        if "video" in request:
            total = self.pixel_shape(request)[0]
            if given > total:
                raise ValueError(f"{name} is longer than the input video {request['name']} ({total / rate:.2f} s)")
            if cfg.context_mode == "extend" and given == total:
                raise ValueError(f"{name} is as long as the input video {request['name']}: nothing left to extend")
        else:
            total = given + round(self.text_duration * rate) if cfg.context_mode == "extend" else given
        gap = None
        if cfg.context_mode == "infill":
            start, end = cfg.context_span
            if end * rate > given:
                raise ValueError(f"model.sample.context_span={[start, end]} must lie inside {name}")
            gap = (round(start * rate), round(end * rate))
        padded = torch.nn.functional.pad(audio, (0, total - given))
        mask = context_mask(given, total, self.codec.hop, gap)[None]
        return {**request, "samples": total, "context_audio": padded, "context_mask": mask}

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
            samples = request.get("samples") or self.pixel_shape(request)[0]
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
