"""The Movie Gen spatial upsampler (arXiv 2410.13720 §3.1.6): video-to-video generation by flow matching.

Given a low-resolution video v (H/r × W/r), the model generates the latent of the high-resolution video
conditioned on the latent of v bilinearly upsampled to full size, concatenated on the channels:

    c   = Enc(Bilinear↑r(v))                     the condition, frame-wise through the codec
    X_1 = Enc(x)                                 the target: the full-resolution clip's latent
    u   = DiT([X_t ; c], t, P)                   the DiT's patchify takes C + C channels; the condition's
                                                 weights start at zero (a T2V checkpoint starts unchanged)

Training pairs come from full-resolution clips: v = Bilinear↓r(x) (+ optional Gaussian noise of std
`degrade_noise` on v, a stand-in for the paper's second-order degradations and TAE artifacts). The flow-matching
path, loss, text dropout and EMA are those of `VideoGenModule`.

Sampling (`upsample`): Euler over `sampling.steps` (the paper: 20) of the linear-quadratic schedule, the
DiT run on overlapping windows of `window` latent frames with `overlap` frames, fused at every step
MultiDiffusion-style (`generative.multidiffusion.fuse_windows`; the paper: 14-frame windows, 4 overlapping).

Logged at validation / test: `<stage>/psnr_upsampled` (model) and `<stage>/psnr_bilinear` (the baseline) of the
full-resolution reconstruction against the real clip, pixels in [0, 1].
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_modules.base import OptimizerFactory, SchedulerFactory
from lightning_modules.generative import guidance, multidiffusion, paths, solvers, timesteps
from lightning_modules.nn.dit import DiT
from lightning_modules.nn.text import TextConditioner, pad_context
from lightning_modules.video_gen import VideoGenModule


def resize_video(video: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear resize of every frame of [B, C, T, H, W] to [B, C, T, height, width] (antialiased when shrinking)."""
    b, c, t, h, w = video.shape
    frames = video.transpose(1, 2).reshape(b * t, c, h, w)
    shrink = height < h or width < w
    frames = nn.functional.interpolate(frames, size=(height, width), mode="bilinear", align_corners=False,
                                       antialias=shrink)
    return frames.reshape(b, t, c, height, width).transpose(1, 2)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """10·log10(1 / MSE) with pixels mapped from [-1, 1] to [0, 1], per clip → [B]."""
    mse = ((x.clamp(-1, 1) - y.clamp(-1, 1)) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


class UpsamplerModule(VideoGenModule):
    """See the module docstring. Arguments of `VideoGenModule`, plus:

    Args:
        scale: r, the upsampling factor (the paper: 2).
        degrade_noise: std of Gaussian noise added to the low-resolution input in training (0 = none).
        window, overlap: temporal windows in latent frames for sampling (MultiDiffusion fusion).
        weighting: "uniform" or "triangular" window weights.
    """

    def __init__(self, net: DiT, text: TextConditioner, codec: nn.Module, optimizer: OptimizerFactory,
                 scheduler: SchedulerFactory | None = None, scale: int = 2, degrade_noise: float = 0.0,
                 window: int = 14, overlap: int = 4, weighting: str = "uniform", **kwargs: Any) -> None:
        if net.cond_channels != net.in_channels:
            raise ValueError(f"the upsampler's DiT needs cond_channels = in_channels ({net.in_channels}), got "
                             f"{net.cond_channels}")
        super().__init__(net, text, codec, optimizer, scheduler, **kwargs)
        self.scale, self.degrade_noise = int(scale), float(degrade_noise)
        self.window, self.overlap, self.weighting = int(window), int(overlap), weighting

    # -- data ---------------------------------------------------------------------------------------------------------
    def low_resolution(self, video: torch.Tensor, train: bool = False) -> torch.Tensor:
        """v = Bilinear↓r(x) (+ noise in training)."""
        h, w = video.shape[-2:]
        if h % self.scale or w % self.scale:
            raise ValueError(f"upsampler: H, W = {h}, {w} must be multiples of scale={self.scale}")
        low = resize_video(video, h // self.scale, w // self.scale)
        if train and self.degrade_noise > 0:
            low = (low + self.degrade_noise * torch.randn_like(low)).clamp(-1, 1)
        return low

    def condition(self, low: torch.Tensor) -> torch.Tensor:
        """c = normalised Enc(Bilinear↑r(v)) for a low-resolution video v."""
        up = resize_video(low, low.shape[-2] * self.scale, low.shape[-1] * self.scale)
        with torch.no_grad():
            return (self.codec.encode(up) - self.latent_mean) / self.latent_std

    # -- training -----------------------------------------------------------------------------------------------------
    def flow_loss(self, batch: dict[str, Any], t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                  dropout: float = 0.0) -> torch.Tensor:
        video = batch["video"].float()
        x1 = self.to_latent(batch)
        cond = self.condition(self.low_resolution(video, train=self.training))
        b, frames = x1.shape[0], video.shape[2]
        fps = self._fps(batch, b, x1.device)
        prompts = self.training_prompts(list(batch["text"]), fps, frames, dropout)
        if t is None:
            t = self.sample_times(b, x1.device)
        _, x_t, target = paths.sample_path(x1, t, self.sigma_min, noise)
        return paths.flow_matching_loss(self(x_t, t, fps=fps, cond=cond, prompts=prompts), target)

    # -- sampling -----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def upsample(self, low: torch.Tensor, captions: list[str], fps: float | torch.Tensor = 0.0, *,
                 steps: int | None = None, guidance_scale: float | None = None, seed: int | None = None,
                 window: int | None = None, overlap: int | None = None) -> torch.Tensor:
        """Full-resolution videos [B, 3, T, r·h, r·w] from low-resolution ones [B, 3, T, h, w] (see the module
        docstring); the DiT sees `window` latent frames at a time, fused over overlaps."""
        cfg = self.sampling
        b, _, frames, h, w = low.shape
        low = low.to(self.device).float()
        cond = self.condition(low)
        x0 = self.noise(tuple(cond.shape[1:]), cfg.seed if seed is None else seed, b).to(cond)
        fps_t = torch.as_tensor(fps, dtype=torch.float32, device=self.device).flatten().expand(b)
        scale = cfg.guidance if guidance_scale is None else guidance_scale
        prompts = self.prompts(list(captions), fps_t, frames)
        if scale == 1.0:
            context, mask = self(prompts=prompts)
            fps_in, cond_in = fps_t, cond
        else:
            context, mask = pad_context([self(prompts=prompts), self(prompts=[""] * b)])
            fps_in, cond_in = torch.cat([fps_t, fps_t]), torch.cat([cond, cond])

        def windowed(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            def one_window(piece: torch.Tensor, span: tuple[int, int]) -> torch.Tensor:
                return self(piece, t, context, mask, fps=fps_in, cond=cond_in[:, :, span[0]:span[1]])

            return multidiffusion.fuse_windows(one_window, x, window or self.window, self.overlap if overlap is None
                                               else overlap, dim=2, weighting=self.weighting)

        model_fn = windowed if scale == 1.0 else guidance.classifier_free_guidance(windowed, scale)
        grid = timesteps.schedule(cfg.schedule, steps or cfg.steps, cfg.emulated_steps)
        x1 = solvers.solver(cfg.solver)(model_fn, x0, grid)
        return self.from_latent(x1, frames)

    def _evaluate(self, batch: dict[str, Any], stage: str, limit: int | None = None) -> None:
        """PSNR of the upsampled and of the bilinear video against the real one (first `limit` clips)."""
        video = batch["video"][:limit].float()
        low = self.low_resolution(video)
        fps = self._fps(batch, len(batch["text"]), self.device)[: video.shape[0]]
        up = self.upsample(low, list(batch["text"][: video.shape[0]]), fps, steps=self.media.steps)
        bilinear = resize_video(low, video.shape[-2], video.shape[-1])
        b = video.shape[0]
        self.log(f"{stage}/psnr_upsampled", psnr(up, video).mean(), batch_size=b)
        self.log(f"{stage}/psnr_bilinear", psnr(bilinear, video).mean(), batch_size=b)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        if batch_idx == 0:
            self._evaluate(batch, "val", limit=self.media.max_samples)

    def on_test_start(self) -> None:
        self._evaluator = None

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self._eval_prefix)

    def on_test_epoch_end(self) -> None:
        return None

    @torch.no_grad()
    def media_samples(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """{"upsampled" | "bilinear" | "real"}: the model's output, the bilinear baseline and the real clips."""
        n = min(self.media.max_samples, len(batch["text"]))
        video = batch["video"][:n].float()
        low = self.low_resolution(video)
        fps = self._fps(batch, len(batch["text"]), self.device)[:n]
        return {"upsampled": self.upsample(low, list(batch["text"][:n]), fps, steps=self.media.steps),
                "bilinear": resize_video(low, video.shape[-2], video.shape[-1]), "real": video}

    def run_task(self, name: str, trainer: Any, datamodule: Any, cfg: Any) -> Any:
        if name == "evaluate":
            return super().run_task(name, trainer, datamodule, cfg)
        raise ValueError(f"task={name!r} is not offered by {type(self).__name__}; it supports fit, validate, test, "
                         "evaluate")
