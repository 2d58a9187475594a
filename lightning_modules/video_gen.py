"""Text-to-image and text-to-video generation with the Movie Gen transformer and flow matching.

Batches follow the datamodules' schema: "video" float32 [B, 3, T, H, W] in [-1, 1] (images: T = 1, fps 0),
"text" list[str], "fps" float32 [B], "meta" list[dict]; or, from a latent cache (`task=encode` of the TAE),
"latent" float32 [B, C, T', H', W'] in place of "video". Image batches and video batches alternate (the
datamodule's `image_ratio`), which is joint T2I/T2V training.

Latent space (`codec`, see `nn.codecs`): a frozen TAE loaded from a checkpoint, or the parameter-free
`PixelCodec` (space-to-depth of the pixels). The quickstart uses the pixel codec, so it needs no trained TAE:
a (1, 2, 2) patch of its 2× space-to-depth latent is a 4×4 pixel patch (48 values, below the model width: a
token narrower than its patch cannot remove all of the patch's noise, and samples stay noisy). Latents are normalised
X_1 = (z − mean) / std with the config's `latent_mean` / `latent_std` (scalars or per channel; the latent
cache's index.json holds per-channel statistics).

Training step (Movie Gen §3.1.2; formulas in `generative.paths` and `generative.timesteps`):

    prompt = "FPS-<fps> " + caption (videos, when `fps_in_text`), replaced by "" with probability p_drop
    P = TextConditioner(prompt);  t = sigmoid(n), n ~ N(m, s²);  X_0 ~ N(0, I)
    X_t = t·X_1 + (1 − (1 − σ_min)·t)·X_0;   loss = mean ‖DiT(X_t, t, P) − (X_1 − (1 − σ_min)·X_0)‖²

Logged: train/loss (and train/loss_image, train/loss_video), val/loss on a fixed grid of 10 times
t_k = (k + 0.5)/10 with fixed noise per batch (the paper's development proxy), and at test (after fit) or with
`task=evaluate`: samples for the held-out prompts (mp4s in MLflow under samples/) and the probe metrics of
`lightning_modules.probe` (<stage>/alignment, <stage>/alignment_<attribute>, <stage>/alignment_real,
<stage>/fd).

Sampling (§3.4): Euler over the linear-quadratic schedule (50 steps emulating 1000 by default), classifier-free
guidance with the empty prompt as the unconditional branch, noise from a seed per sample
(seed + index), so a prompt's video does not depend on its batch. `task=sample`: a prompt file (one prompt per
line) → mp4s (png for 1 frame), with the checkpoint's EMA weights when it has them.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from lightning_modules.base import BaseModule, OptimizerFactory, SchedulerFactory
from lightning_modules.checkpoint_io import newest_checkpoint, read_module_state
from lightning_modules.generative import guidance, paths, solvers, timesteps
from lightning_modules.nn.dit import DiT, grow_position_tables
from lightning_modules.nn.text import TextConditioner, pad_context


@dataclass
class TimeSampler:
    """Training times t = shift(sigmoid(n)), n ~ N(mean, std²) (see `generative.timesteps`)."""

    mean: float = 0.0
    std: float = 1.0
    shift: float = 1.0


@dataclass
class SamplingConfig:
    """How samples are drawn: solver over a schedule of `steps` (emulating `emulated_steps`), CFG scale, seed."""

    steps: int = 50
    schedule: str = "linear_quadratic"
    emulated_steps: int = 1000
    guidance: float = 7.5
    solver: str = "euler"
    seed: int = 0


@dataclass
class MediaConfig:
    """`media_samples` (for callbacks.media.MediaLogger): clips and solver steps."""

    max_samples: int = 4
    steps: int = 20


@dataclass
class SampleTaskConfig:
    """`task=sample`: prompts file, where to write, clip size and rate (frames = 1 writes images)."""

    prompts: str | None = None
    output_dir: str | None = None
    frames: int = 8
    height: int = 32
    width: int = 32
    fps: float = 8.0
    batch_size: int = 4
    per_prompt: int = 1


@dataclass
class EvaluationConfig:
    """Held-out evaluation (test loop after fit, `task=evaluate`).

    probe: train / load the probe and log alignment and Fréchet distance; probe_cache_dir: where trained probes
    are kept; probe_*: `probe.ProbeConfig`; write_samples: clips written as mp4 and logged to MLflow;
    output_dir: where (default <run dir>/samples).
    """

    probe: bool = True
    probe_cache_dir: str | None = None
    probe_width: int = 16
    probe_features: int = 32
    probe_steps: int = 600
    probe_lr: float = 2e-3
    write_samples: int = 8
    output_dir: str | None = None


def _config(cls: type, value: Any, name: str) -> Any:
    if isinstance(value, cls):
        return value
    try:
        return cls(**dict(value or {}))
    except TypeError as exc:
        raise TypeError(f"model.{name}: {exc} (known keys: {sorted(cls.__dataclass_fields__)})") from exc


def fps_prompt(caption: str, fps: float, frames: int) -> str:
    """Movie Gen's frame-rate conditioning: "FPS-<fps> <caption>" for videos, the caption alone for images."""
    return f"FPS-{fps:g} {caption}" if frames > 1 and fps > 0 else caption


def _channel_stat(value: float | list[float], channels: int, name: str) -> torch.Tensor:
    values = torch.as_tensor(value, dtype=torch.float32).flatten()
    if values.numel() not in (1, channels):
        raise ValueError(f"model.{name} has {values.numel()} values; give one or one per latent channel ({channels})")
    return values.expand(channels).clone().view(1, channels, 1, 1, 1)


def slug(text: str, length: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:length] or "empty"


class VideoGenModule(BaseModule):
    """Joint text-to-image / text-to-video flow matching on latents. See the module docstring.

    Args:
        net: the `DiT` backbone; text: the `TextConditioner`; codec: `PixelCodec` or `TAECodec`.
        sigma_min: σ_min of the path; time_sampler: `TimeSampler` fields.
        text_dropout: probability of training on the empty prompt (for classifier-free guidance).
        fps_in_text: prefix video captions with "FPS-<fps> " (the paper's frame-rate conditioning).
        latent_mean, latent_std: normalisation of the codec's latents (scalar or per channel).
        sampling: `SamplingConfig` fields; val_times: size of the fixed validation time grid.
        media, sample, evaluation: `MediaConfig`, `SampleTaskConfig`, `EvaluationConfig` fields.
        init_from: weights to start from (the previous stage): a checkpoint, or a folder whose newest
            `**/checkpoints/last.ckpt` is used; position tables grow to this model's sizes. A missing one is an
            error, except under `trainer.fast_dev_run` (a wiring check), where it is skipped with a warning.
    """

    def __init__(
        self,
        net: DiT,
        text: TextConditioner,
        codec: nn.Module,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "step",
        sigma_min: float = paths.SIGMA_MIN,
        time_sampler: dict | TimeSampler | None = None,
        text_dropout: float = 0.1,
        fps_in_text: bool = True,
        latent_mean: float | list[float] = 0.0,
        latent_std: float | list[float] = 1.0,
        sampling: dict | SamplingConfig | None = None,
        val_times: int = 10,
        media: dict | MediaConfig | None = None,
        sample: dict | SampleTaskConfig | None = None,
        evaluation: dict | EvaluationConfig | None = None,
        init_from: str | None = None,
    ) -> None:
        super().__init__(optimizer, scheduler, scheduler_interval)
        if text.dim != net.dim:
            raise ValueError(f"model.text.dim={text.dim} must equal model.net.dim={net.dim}")
        if codec.latent_channels != net.in_channels:
            raise ValueError(f"model.net.in_channels={net.in_channels} must equal the codec's latent channels "
                             f"({codec.latent_channels})")
        if not 0.0 <= text_dropout < 1.0:
            raise ValueError(f"model.text_dropout={text_dropout} must be in [0, 1)")
        self.net, self.text, self.codec = net, text, codec
        self.sigma_min, self.text_dropout, self.fps_in_text = sigma_min, text_dropout, fps_in_text
        self.time_sampler = _config(TimeSampler, time_sampler, "time_sampler")
        self.sampling = _config(SamplingConfig, sampling, "sampling")
        self.media = _config(MediaConfig, media, "media")
        self.sample_cfg = _config(SampleTaskConfig, sample, "sample")
        self.evaluation = _config(EvaluationConfig, evaluation, "evaluation")
        self.val_times, self.init_from = val_times, init_from
        self.register_buffer("latent_mean", _channel_stat(latent_mean, net.in_channels, "latent_mean"))
        self.register_buffer("latent_std", _channel_stat(latent_std, net.in_channels, "latent_std"))
        self._evaluator: Any = None
        self._eval_prefix = "test"
        self._written = 0

    # -- parallelism -------------------------------------------------------------------------------------------------
    def shard_units(self) -> list[nn.Module]:
        """FSDP2 / activation-checkpointing units: the transformer blocks and the text conditioner. The DiT's
        other parameters (patchify, position tables, time MLP, output) belong to the root module, whose
        parameters FSDP2 gathers only around `forward`: every use of the networks goes through self(...)."""
        return [*self.net.blocks, self.text]

    def forward(self, x: torch.Tensor | None = None, t: torch.Tensor | None = None, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, fps: torch.Tensor | None = None, cond: torch.Tensor | None = None,
                prompts: list[str] | None = None) -> Any:
        """The DiT's velocity u(x, t, P) (see `nn.dit.DiT.forward`). With `prompts`, the text context P is
        encoded first in the same call; `self(prompts=...)` alone returns (P, mask)."""
        if prompts is not None:
            context, mask = self.text(prompts)
            if x is None:
                return context, mask
        return self.net(x, t, context, mask, fps=fps, cond=cond)

    # -- starting from a previous stage ----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.init_from:
            try:
                path = newest_checkpoint(self.init_from)
            except FileNotFoundError:
                if self.trainer is not None and self.trainer.fast_dev_run:
                    print(f"[video_gen] fast_dev_run: model.init_from={self.init_from} not found; starting from scratch")
                    return
                raise
            self.load_stage_weights(path)

    def load_stage_weights(self, path: str | Path) -> None:
        """Load a previous stage's weights (file or sharded folder; not the optimizer), growing position tables."""
        state = grow_position_tables(read_module_state(path), self.net, prefix="net.")
        missing, unexpected = self.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"model.init_from={path} does not fit: missing {missing[:6]}, unexpected {unexpected[:6]}")
        print(f"[video_gen] initialised from {path}")

    # -- latents and text --------------------------------------------------------------------------------------------
    def to_latent(self, batch: dict[str, Any]) -> torch.Tensor:
        """X_1 = (z − mean) / std, z from the batch's "latent" (a cache) or the codec's encoding of "video"."""
        if "latent" in batch:
            z = batch["latent"].float()
        else:
            with torch.no_grad():
                z = self.codec.encode(batch["video"].float())
        return (z - self.latent_mean) / self.latent_std

    def from_latent(self, x1: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        """Pixels in [-1, 1] from a normalised latent."""
        return self.codec.decode(x1 * self.latent_std + self.latent_mean, num_frames).clamp(-1.0, 1.0)

    def prompts(self, captions: list[str], fps: torch.Tensor | list[float] | None, frames: int) -> list[str]:
        if not self.fps_in_text or fps is None:
            return list(captions)
        return [fps_prompt(c, float(f), frames) for c, f in zip(captions, fps)]

    @staticmethod
    def _fps(batch: dict[str, Any], batch_size: int, device: torch.device) -> torch.Tensor:
        fps = batch.get("fps")
        if fps is None:
            return torch.zeros(batch_size, device=device)
        return torch.as_tensor(fps, dtype=torch.float32, device=device).flatten().expand(batch_size)

    @staticmethod
    def _frames(batch: dict[str, Any]) -> int:
        if "video" in batch:
            return int(batch["video"].shape[2])
        return int((batch.get("meta") or [{}])[0].get("latent", {}).get("frames", batch["latent"].shape[2]))

    # -- training ----------------------------------------------------------------------------------------------------
    def training_prompts(self, captions: list[str], fps: torch.Tensor, frames: int, dropout: float) -> list[str]:
        """Prompts for a training batch; each caption is replaced by "" with probability `dropout` (for CFG)."""
        if dropout > 0:
            drop = torch.rand(len(captions)) < dropout
            captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        return [p if c else "" for p, c in zip(self.prompts(captions, fps, frames), captions)]

    def sample_times(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """Training times t = shift(sigmoid(n)), n ~ N(mean, std²) (the config's time sampler)."""
        s = self.time_sampler
        t = timesteps.logit_normal(batch_size, s.mean, s.std, device=device)
        return timesteps.shift_time(t, s.shift) if s.shift != 1.0 else t

    def flow_loss(self, batch: dict[str, Any], t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                  dropout: float = 0.0) -> torch.Tensor:
        """The flow-matching loss of a batch at times t (default: logit-normal draws)."""
        x1 = self.to_latent(batch)
        b = x1.shape[0]
        frames = self._frames(batch)
        fps = self._fps(batch, b, x1.device)
        prompts = self.training_prompts(list(batch["text"]), fps, frames, dropout)
        if t is None:
            t = self.sample_times(b, x1.device)
        _, x_t, target = paths.sample_path(x1, t, self.sigma_min, noise)
        prediction = self(x_t, t, fps=fps, prompts=prompts)
        return paths.flow_matching_loss(prediction, target)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.flow_loss(batch, dropout=self.text_dropout)
        kind = "image" if self._frames(batch) == 1 else "video"
        b = len(batch["text"])
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        self.log(f"train/loss_{kind}", loss, batch_size=b)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Loss on the fixed grid t_k = (k + 0.5) / K with noise seeded by the batch index."""
        x1 = self.to_latent(batch)
        generator = torch.Generator().manual_seed(10_000 + batch_idx)
        losses = []
        for k in range(self.val_times):
            t = torch.full((x1.shape[0],), (k + 0.5) / self.val_times, device=x1.device)
            noise = torch.randn(x1.shape, generator=generator).to(x1)
            losses.append(self.flow_loss(batch, t=t, noise=noise))
        self.log("val/loss", torch.stack(losses).mean(), prog_bar=True, batch_size=x1.shape[0])

    # -- sampling ----------------------------------------------------------------------------------------------------
    def noise(self, shape: tuple[int, ...], seed: int, count: int) -> torch.Tensor:
        """[count, *shape] noise; sample i from its own generator seeded with seed + i."""
        return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(count)])

    @torch.no_grad()
    def generate(self, captions: list[str], frames: int, height: int, width: int, fps: float | list[float] = 0.0, *,
                 steps: int | None = None, guidance_scale: float | None = None, schedule: str | None = None,
                 seed: int | None = None, noise: torch.Tensor | None = None, return_latent: bool = False,
                 ) -> torch.Tensor:
        """Videos [B, 3, frames, height, width] in [-1, 1] for `captions` (see the module docstring); with
        `return_latent`, the normalised latent X_1 the solver reached instead."""
        cfg = self.sampling
        steps = steps or cfg.steps
        scale = cfg.guidance if guidance_scale is None else guidance_scale
        b = len(captions)
        shape = self.codec.latent_shape(frames, height, width)
        if noise is None:
            noise = self.noise(shape, cfg.seed if seed is None else seed, b)
        x0 = noise.to(self.device, torch.float32)
        fps_t = torch.as_tensor(fps, dtype=torch.float32, device=self.device).flatten().expand(b)
        if frames == 1:
            fps_t = torch.zeros_like(fps_t)
        prompts = self.prompts(list(captions), fps_t, frames)
        cond = self(prompts=prompts)
        grid = timesteps.schedule(schedule or cfg.schedule, steps, cfg.emulated_steps)
        solve = solvers.solver(cfg.solver)
        if scale == 1.0:
            def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                return self(x, t, cond[0], cond[1], fps=fps_t)
        else:
            context, mask = pad_context([cond, self(prompts=[""] * b)])
            fps2 = torch.cat([fps_t, fps_t])

            def paired_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                return self(x, t, context, mask, fps=fps2)

            model_fn = guidance.classifier_free_guidance(paired_fn, scale)
        x1 = solve(model_fn, x0, grid)
        return x1 if return_latent else self.from_latent(x1, frames)

    def _batch_shape(self, batch: dict[str, Any]) -> tuple[int, int, int]:
        if "video" in batch:
            return tuple(int(s) for s in batch["video"].shape[2:])
        latent = (batch.get("meta") or [{}])[0].get("latent") or {}
        if not latent:
            raise ValueError("a latent batch needs meta[i]['latent'] with frames, height, width to be decoded")
        return int(latent["frames"]), int(latent["height"]), int(latent["width"])

    @torch.no_grad()
    def media_samples(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """{"sample": generated clips for the batch's captions, "real": the batch's clips} (MediaLogger)."""
        n = min(self.media.max_samples, len(batch["text"]))
        frames, height, width = self._batch_shape(batch)
        fps = self._fps(batch, len(batch["text"]), self.device)[:n]
        out = {"sample": self.generate(list(batch["text"][:n]), frames, height, width, fps, steps=self.media.steps)}
        if "video" in batch:
            out["real"] = batch["video"][:n].float()
        return out

    # -- held-out evaluation: test loop after fit, and task=evaluate --------------------------------------------------
    def on_test_start(self) -> None:
        self._written = 0
        self._evaluator = None
        ev = self.evaluation
        if not ev.probe or self.trainer is None or self.trainer.datamodule is None:
            return
        if self.trainer.fast_dev_run:
            print("[video_gen] fast_dev_run: the probe evaluation is skipped (samples are still drawn)")
            return
        from lightning_modules.probe import ProbeConfig, ProbeEvaluator, probe_from_datamodule

        config = ProbeConfig(width=ev.probe_width, features=ev.probe_features, steps=ev.probe_steps, lr=ev.probe_lr)
        probe = probe_from_datamodule(self.trainer.datamodule, config, ev.probe_cache_dir, self.device)
        self._evaluator = ProbeEvaluator(probe)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Generate a clip per held-out caption; write the first `write_samples`; score them with the probe."""
        frames, height, width = self._batch_shape(batch)
        b = len(batch["text"])
        fps = self._fps(batch, b, self.device)
        videos = self.generate(list(batch["text"]), frames, height, width, fps,
                               seed=self.sampling.seed + 1000 * batch_idx)
        self._write_samples(videos, list(batch["text"]), fps)
        if self._evaluator is not None and frames > 1 and "video" in batch:
            self._evaluator.update(videos, batch["video"], batch["meta"])

    def on_test_epoch_end(self) -> None:
        if self._evaluator is None:
            return
        for name, value in self._evaluator.compute().items():
            self.log(f"{self._eval_prefix}/{name}", value)
        self._evaluator = None

    def _output_dir(self, configured: str | None, name: str) -> Path:
        if configured:
            return Path(configured)
        root = self.trainer.default_root_dir if self.trainer is not None else "."
        return Path(root) / name

    def _write_samples(self, videos: torch.Tensor, captions: list[str], fps: torch.Tensor) -> None:
        left = self.evaluation.write_samples - self._written
        if left <= 0 or self.trainer is None or not self.trainer.is_global_zero:
            return
        from datamodules.media import write_video

        folder = self._output_dir(self.evaluation.output_dir, "samples")
        paths_written = []
        for video, caption, rate in list(zip(videos, captions, fps.tolist()))[:left]:
            path = folder / f"{self._written:03d}_{slug(caption)}.mp4"
            paths_written.append(write_video(path, video.cpu(), fps=rate if rate > 0 else 8.0))
            path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
            paths_written.append(path.with_suffix(".txt"))
            self._written += 1
        self._log_artifacts(paths_written, "samples")

    def _log_artifacts(self, files: list[Path], artifact_path: str) -> None:
        for logger in self.trainer.loggers if self.trainer is not None else []:
            if hasattr(logger, "run_id") and hasattr(logger.experiment, "log_artifact"):
                for path in files:
                    logger.experiment.log_artifact(logger.run_id, str(path), artifact_path=artifact_path)

    # -- custom tasks ------------------------------------------------------------------------------------------------
    def run_task(self, name: str, trainer: L.Trainer, datamodule: L.LightningDataModule | None, cfg: Any) -> Any:
        """`task=sample` (prompt file → videos) and `task=evaluate` (held-out samples + probe metrics)."""
        if name not in ("sample", "evaluate"):
            raise ValueError(f"task={name!r} is not offered by {type(self).__name__}; it supports fit, validate, "
                             "test, sample, evaluate")
        ckpt_path = cfg.get("ckpt_path") if cfg is not None else None
        ema = False
        if ckpt_path:
            from callbacks.ema import load_ema_weights
            from experiments.runner import resolve_ckpt_path

            ema = load_ema_weights(self, resolve_ckpt_path(cfg))
        print(f"[video_gen] task={name}: weights from {ckpt_path or 'the initialisation (no ckpt_path)'}"
              f"{' (EMA)' if ema else ''}")
        if name == "sample":
            return self.sample_prompts(trainer)
        self._eval_prefix = "eval"
        try:
            return trainer.test(self, datamodule=datamodule)
        finally:
            self._eval_prefix = "test"

    def read_prompts(self) -> list[str]:
        path = self.sample_cfg.prompts
        if not path:
            raise ValueError("task=sample needs model.sample.prompts=<a text file, one prompt per line>")
        if not Path(path).is_file():
            raise FileNotFoundError(f"model.sample.prompts={path}: no such file")
        prompts = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"model.sample.prompts={path} holds no prompts")
        return prompts

    @torch.no_grad()
    def sample_prompts(self, trainer: L.Trainer) -> list[Path]:
        """Write one clip per prompt (and `per_prompt` seeds) to `sample.output_dir`; log them to MLflow."""
        from datamodules.media import write_image, write_video

        cfg = self.sample_cfg
        prompts = [p for p in self.read_prompts() for _ in range(cfg.per_prompt)]
        self.to(trainer.strategy.root_device).eval()
        folder = Path(cfg.output_dir) if cfg.output_dir else Path(trainer.default_root_dir) / "samples"
        written: list[Path] = []
        for start in range(0, len(prompts), cfg.batch_size):
            chunk = prompts[start:start + cfg.batch_size]
            videos = self.generate(chunk, cfg.frames, cfg.height, cfg.width, cfg.fps, seed=self.sampling.seed + start)
            for i, (video, prompt) in enumerate(zip(videos, chunk)):
                stem = folder / f"{start + i:03d}_{slug(prompt)}"
                if cfg.frames == 1:
                    written.append(write_image(stem.with_suffix(".png"), video[:, 0].cpu()))
                else:
                    written.append(write_video(stem.with_suffix(".mp4"), video.cpu(), fps=cfg.fps))
                stem.with_suffix(".txt").write_text(prompt + "\n", encoding="utf-8")
            print(f"[video_gen] {min(start + cfg.batch_size, len(prompts))}/{len(prompts)} prompts sampled")
        for logger in trainer.loggers:
            if hasattr(logger, "run_id") and hasattr(logger.experiment, "log_artifact"):
                for path in written:
                    logger.experiment.log_artifact(logger.run_id, str(path), artifact_path="samples")
                logger.experiment.log_text(logger.run_id, "\n".join(prompts) + "\n", "samples/prompts.txt")
                logger.experiment.log_dict(logger.run_id, asdict(self.sampling), "samples/sampling.json")
        print(f"[video_gen] wrote {len(written)} samples to {folder}")
        return written
