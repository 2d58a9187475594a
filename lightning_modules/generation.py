"""THE generative LightningModule: every generative line is a configuration of it.

    backbone      a network x_t, t, conditions → prediction (`nn.dit.DiT`; a UNet later)
    codec         the latent space: `PixelCodec`, or a frozen TAE (`nn.codecs`); X_1 = (Enc(x) − mean) / std
    conditioners  name → `conditioning.Conditioner` (text, concatenated latents, extra tokens, frame features),
                  each with its own dropout and null value; assembled into `conditioning.Conditions`
    objective     an affine path x_t = α_t·X_1 + σ_t·X_0 and what the backbone predicts (`generative.paths`)
    time_sampler  training times (logit-normal with a shift, or uniform; `generative.timesteps`)
    sampler       solver, schedule, guidance (a scale per condition), temporal windows (`generative.*`)
    evaluators    metrics and sample writing in the test loop (`evaluation`), named in the config

Training step (Movie Gen §3.1.2 for the flow-matching objective):

    X_1 = latent of the batch;  raw_c = conditioner_c.inputs(batch), dropped to its null value w.p. p_c
    t ~ time_sampler;  X_0 ~ N(0, I);  X_t = α_t·X_1 + σ_t·X_0
    loss = mean ‖backbone(X_t, t, C) − target_t‖²      target = velocity, ε, data or v (the objective's)

Sampling: noise from a seed per sample (seed + index, so a sample does not depend on its batch), the solver over
the schedule, multi-condition classifier-free guidance over the conditions named in `sampler.guidance`:

    p_0 = all guided conditions null, p_i = the first i on;   out = p_0 + Σ_i s_i·(p_i − p_{i−1})

(one pass when every scale is 1; one pass with every condition on and the scales as an input for a
guidance-distilled backbone, `net.guidance_inputs` > 0: `lightning_modules.distillation`), the backbone run on
overlapping windows of latent frames fused MultiDiffusion-style when `sampler.window` is set.

Batches follow the datamodules' schema: "video" [B, 3, T, H, W] in [-1, 1] (images: T = 1), "text", "fps",
"meta"; or "latent" [B, C, T', H', W'] from a latent cache in place of "video". Logged: train/loss (and
train/loss_image | train/loss_video), val/loss on a fixed grid of times with fixed noise (the paper's
development proxy), media through `callbacks.media.MediaLogger` (`media_samples`), and the evaluators' metrics.
Tasks: `task=sample` (a prompt file, and/or a folder of videos to condition on → mp4s) and `task=evaluate`
(the test loop under the "eval/" prefix). The runner loads the checkpoint's (EMA) weights before either.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from datamodules.media import decode_image, decode_video, frames_to_video, write_gif
from lightning_modules.base import BaseModule, OptimizerFactory, SchedulerFactory
from lightning_modules.checkpoint_io import newest_checkpoint, read_module_state
from lightning_modules.conditioning import Conditioner, Conditions, ReferenceImage, assemble, resize_video
from lightning_modules.conditioning.text import batch_fps
from lightning_modules.evaluation import Evaluator
from lightning_modules.evaluation.probe import train_batches
from lightning_modules.evaluation.samples import log_artifacts, slug, write_clip
from lightning_modules.generative import guidance, multidiffusion, paths, solvers, timesteps
from lightning_modules.nn.attention import MiddleFrameAnchors, install_anchors
from lightning_modules.nn.dit import DiT, grow_input_channels, grow_position_tables


@dataclass
class Objective:
    """The affine path, the backbone's prediction type ("velocity", "epsilon", "data" or "v") and the noise:
    `frame_correlation` a > 0 correlates every clip's frames, in training and in sampling alike, by PYoCo's
    `frame_noise` prior: "mixed" (a shared component, `paths.correlate_frames`) or "progressive" (an AR(1) chain in
    time, `paths.progressive_frames`); 0 (default) is i.i.d. N(0, I)."""

    path: paths.AffinePath = field(default_factory=paths.FlowMatchingPath)
    prediction: str = "velocity"
    frame_correlation: float = 0.0
    frame_noise: str = "mixed"

    def noise(self, shape: tuple[int, ...], generator: torch.Generator | None = None,
              device: torch.device | str | None = None) -> torch.Tensor:
        """X_0 of a batch of latents [B, C, T, H, W] (or images [B, C, H, W]: nothing to correlate). With a
        generator the draw is made on its (CPU) device and then moved."""
        draw_on = None if generator is not None else device
        noise = torch.randn(shape, generator=generator, device=draw_on)
        if self.frame_correlation and len(shape) == 5:
            if self.frame_noise == "progressive":
                noise = paths.progressive_frames(noise, self.frame_correlation)
            else:
                shared = torch.randn((*shape[:2], 1, *shape[3:]), generator=generator, device=draw_on)
                noise = paths.correlate_frames(noise, shared, self.frame_correlation)
        return noise if device is None else noise.to(device)

    def __post_init__(self) -> None:
        if self.frame_noise not in ("mixed", "progressive"):
            raise ValueError(f"model.objective.frame_noise={self.frame_noise!r}; choose mixed or progressive")
        if self.prediction not in paths.PREDICTIONS:
            raise ValueError(f"model.objective.prediction={self.prediction!r}; choose one of {paths.PREDICTIONS}")


@dataclass
class TimeSampler:
    """Training times: "logit_normal", t = shift(sigmoid(n)), n ~ N(mean, std²); or "uniform" on (0, 1), shifted.

    uniform_fraction: the share of draws taken from U(0, 1) unshifted instead (0: none, the paper's). A large
    shift leaves the low-noise end untrained (shift 6: P(t > 0.9) ≈ 3e-5 under logit-normal), so the last
    solver steps cannot remove the remaining noise (speckle); a uniform share keeps that end covered."""

    kind: str = "logit_normal"
    mean: float = 0.0
    std: float = 1.0
    shift: float = 1.0
    uniform_fraction: float = 0.0

    def __call__(self, batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
        if self.kind == "logit_normal":
            t = timesteps.logit_normal(batch_size, self.mean, self.std, device=device)
        elif self.kind == "uniform":
            t = timesteps.uniform_times(batch_size, device=device)
        else:
            raise ValueError(f"model.time_sampler.kind={self.kind!r}; choose logit_normal or uniform")
        t = timesteps.shift_time(t, self.shift) if self.shift != 1.0 else t
        if self.uniform_fraction > 0:
            if not 0.0 <= self.uniform_fraction <= 1.0:
                raise ValueError(f"model.time_sampler.uniform_fraction={self.uniform_fraction} must be in [0, 1]")
            uniform = timesteps.uniform_times(batch_size, device=device)
            t = torch.where(torch.rand(batch_size, device=device) < self.uniform_fraction, uniform, t)
        return t


@dataclass
class SamplerConfig:
    """How samples are drawn.

    solver: euler | midpoint | ddim; schedule: linear_quadratic | uniform | shifted | leading | trailing |
    linspace, with `steps` (emulating `emulated_steps` for linear_quadratic; `shift` for shifted);
    guidance: condition name → scale, in the order of the passes (e.g. {image: 1.5, text: 7.5} is
    InstructPix2Pix's); guidance_order: that order when it differs from the dict's (a config that adds a
    condition to an inherited {text: ...} cannot put it first); guidance_interval: [t_lo, t_hi], guide only at
    flow times in it, elsewhere all conditions on (null: everywhere; `guidance.guided`); window / overlap /
    weighting: temporal windows in latent frames (null: none); anchor_weight: ω_a of AVID's middle-frame
    attention guidance across windows (0: off; `nn.attention.MiddleFrameAnchors`, for backbones whose blocks have
    an `anchors` slot); seed.
    """

    solver: str = "euler"
    schedule: str = "linear_quadratic"
    steps: int = 50
    emulated_steps: int = 1000
    shift: float = 1.0
    guidance: dict[str, float] = field(default_factory=lambda: {"text": 7.5})
    guidance_order: list[str] | None = None
    guidance_interval: list[float] | None = None
    window: int | None = None
    overlap: int = 0
    weighting: str = "uniform"
    anchor_weight: float = 0.0
    seed: int = 0


@dataclass
class MediaConfig:
    """`media_samples` (for callbacks.media.MediaLogger): clips and solver steps."""

    max_samples: int = 4
    steps: int = 20


@dataclass
class SampleTaskConfig:
    """`task=sample`: a prompts file (one per line) and/or `inputs` (a video or image file or folder of them, each
    with an optional <name>.txt caption: videos are what a conditioner reads as "source", e.g. the upsampler's
    input; images are stickers to animate, written as mp4 and looping GIF);
    where to write; clip size and rate for prompts (frames = 1 writes images); batch size; seeds per prompt;
    reference: an image file every prompt is sampled with, read as "reference" (Movie Gen personalization: a
    masked crop of the identity, as in training; the conditioner resizes it), copied beside the samples."""

    prompts: str | None = None
    inputs: str | None = None
    reference: str | None = None
    output_dir: str | None = None
    frames: int = 8
    height: int = 32
    width: int = 32
    fps: float = 8.0
    batch_size: int = 4
    per_prompt: int = 1


def _config(cls: type, value: Any, name: str) -> Any:
    if isinstance(value, cls):
        return value
    try:
        return cls(**dict(value or {}))
    except TypeError as exc:
        raise TypeError(f"model.{name}: {exc} (known keys: {sorted(cls.__dataclass_fields__)})") from exc


def _channel_stat(value: float | list[float], channels: int, name: str) -> torch.Tensor:
    values = torch.as_tensor(value, dtype=torch.float32).flatten()
    if values.numel() not in (1, channels):
        raise ValueError(f"model.{name} has {values.numel()} values; give one or one per latent channel ({channels})")
    return values.expand(channels).clone().view(1, channels, 1, 1, 1)


class GenerationModule(BaseModule):
    """See the module docstring.

    Args:
        net: the backbone; codec: the latent space; conditioners: name → Conditioner (order matters: context
            tokens and concatenated channels follow it).
        objective, time_sampler, sampler, media, sample: `Objective`, `TimeSampler`, `SamplerConfig`,
            `MediaConfig`, `SampleTaskConfig` (or their fields).
        evaluators: name → `evaluation.Evaluator` for the test loop.
        latent_mean, latent_std: normalisation of the codec's latents (scalar or per channel).
        val_times: size of the fixed validation time grid.
        init_from: weights to start from (the previous stage): a checkpoint, or a folder whose newest
            `**/checkpoints/last.ckpt` is used; position tables grow to this model's sizes and new input channels
            start at zero. A missing one is an error, except under `trainer.fast_dev_run`.
        residual_condition: the name of a concatenated conditioner whose latent c the backbone's prediction is added
            to: X̂_1 = c + net(...) (needs `objective.prediction: data`; None: off, the paper's way). For a clip that
            is mostly its condition (the source of an edit, a sticker to animate) keeping the condition is then the
            net's zero, not a copy carried through every block. A batch without the condition gets zeros for it
            (`LatentConcat`), so the net alone predicts.
    """

    sample_config_class: type[SampleTaskConfig] = SampleTaskConfig  # a line with more sample options subclasses it

    def __init__(
        self,
        net: nn.Module,
        codec: nn.Module,
        conditioners: Mapping[str, Conditioner],
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "step",
        objective: dict | Objective | None = None,
        time_sampler: dict | TimeSampler | None = None,
        sampler: dict | SamplerConfig | None = None,
        evaluators: Mapping[str, Evaluator | None] | None = None,
        latent_mean: float | list[float] = 0.0,
        latent_std: float | list[float] = 1.0,
        val_times: int = 10,
        media: dict | MediaConfig | None = None,
        sample: dict | SampleTaskConfig | None = None,
        init_from: str | None = None,
        residual_condition: str | None = None,
    ) -> None:
        super().__init__(optimizer, scheduler, scheduler_interval)
        conditioners = {name: c for name, c in (conditioners or {}).items() if c is not None}
        self.net, self.codec = net, codec
        self.conditioners = nn.ModuleDict(conditioners)
        self.objective = _config(Objective, objective, "objective")
        self.time_sampler = _config(TimeSampler, time_sampler, "time_sampler")
        self.sampler = _config(SamplerConfig, sampler, "sampler")
        self.media = _config(MediaConfig, media, "media")
        self.sample_cfg = _config(self.sample_config_class, sample, "sample")
        self.evaluators = {name: e for name, e in (evaluators or {}).items() if e is not None}
        self.val_times, self.init_from = val_times, init_from
        self.residual_condition = residual_condition
        self._check_wiring()
        self.register_buffer("latent_mean", _channel_stat(latent_mean, net.in_channels, "latent_mean"))
        self.register_buffer("latent_std", _channel_stat(latent_std, net.in_channels, "latent_std"))
        self._stage_prefix = "test"

    def _check_wiring(self) -> None:
        net = self.net
        if self.codec.latent_channels != net.in_channels:
            raise ValueError(f"model.net.in_channels={net.in_channels} must equal the codec's latent channels "
                             f"({self.codec.latent_channels})")
        concat, offsets = 0, {}  # offsets: where each concatenated condition starts along the channels
        for name, c in self.conditioners.items():
            if c.kind in ("context", "tokens") and getattr(c, "dim", net.dim) != net.dim:
                raise ValueError(f"model.conditioners.{name}: width {c.dim} must equal model.net.dim={net.dim}")
            if c.kind == "concat":
                offsets[name], concat = concat, concat + c.channels
        if self.residual_condition is not None:
            start = offsets.get(self.residual_condition)
            if start is None or self.conditioners[self.residual_condition].channels != net.in_channels:
                raise ValueError(f"model.residual_condition={self.residual_condition!r} must name a concatenated "
                                 f"conditioner of model.net.in_channels={net.in_channels} channels "
                                 f"({sorted(self.conditioners)})")
            if self.objective.prediction != "data":
                raise ValueError(f"model.residual_condition needs model.objective.prediction=data "
                                 f"(X̂_1 = condition + net), not {self.objective.prediction!r}")
            self._residual_channels = slice(start, start + net.in_channels)
        if concat != getattr(net, "cond_channels", 0):
            raise ValueError(f"model.net.cond_channels={getattr(net, 'cond_channels', 0)} must equal the channels of "
                             f"the concatenated conditioners ({concat})")
        if not any(c.kind == "context" for c in self.conditioners.values()):
            raise ValueError("model.conditioners needs a context conditioner (text): the backbone cross-attends to it")
        order = self.sampler.guidance_order
        if order is not None and sorted(order) != sorted(self.sampler.guidance):
            raise ValueError(f"model.sampler.guidance_order={list(order)} must name exactly the guided conditions "
                             f"{sorted(self.sampler.guidance)}")
        guidance.check_interval(self.sampler.guidance_interval, "model.sampler.guidance_interval")
        unknown = sorted(set(self.sampler.guidance) - set(self.conditioners))
        if unknown:
            raise ValueError(f"model.sampler.guidance names {unknown}, which are not conditioners "
                             f"({sorted(self.conditioners)})")

    # -- parallelism -------------------------------------------------------------------------------------------------
    def model_parallel_net(self) -> nn.Module | None:
        return self.net if isinstance(self.net, DiT) else None

    def shard_units(self) -> list[nn.Module]:
        """FSDP2 / activation-checkpointing units: the backbone's blocks and every conditioner with weights. The
        backbone's other parameters belong to the root module, which FSDP2 gathers around `forward` only:
        every use of the backbone goes through self(...)."""
        return [*self.net.blocks, *(c for c in self.conditioners.values() if any(True for _ in c.parameters()))]

    def forward(self, x: torch.Tensor | None, t: torch.Tensor | None, conditions: Conditions | None = None, *,
                embed: tuple[dict[str, Any], torch.Tensor, dict[str, bool | torch.Tensor]] | None = None) -> Any:
        """The backbone's prediction for x_t [B, C, T, H, W] at times t [B] under `conditions`; or, with
        `embed=(raw, fps, on)` (x and t None), the Conditions themselves (see `conditions`). Both go through here
        because FSDP2 gathers the root module's parameters, and initialises its units, around `forward` only."""
        if embed is not None:
            raw, fps, on = embed
            values = {}
            for name, c in self.conditioners.items():
                keep = on.get(name, True)
                keep = keep if isinstance(keep, torch.Tensor) else torch.full((fps.shape[0],), bool(keep))
                values[name] = c(c.drop(raw[name], keep))
            return assemble(dict(self.conditioners), values, fps.to(self.device))
        out = self.net(x, t, **conditions.backbone_kwargs())
        if self.residual_condition is None:
            return out
        return out + conditions.concat[:, self._residual_channels].to(out.dtype)

    # -- starting from a previous stage ----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.init_from:
            try:
                self.load_stage_weights(newest_checkpoint(self.init_from))
            except FileNotFoundError:
                if self.trainer is None or not self.trainer.fast_dev_run:
                    raise
                print(f"[generation] fast_dev_run: model.init_from={self.init_from} not found; starting from scratch")
        if stage == "fit" and hasattr(self.codec, "fit") and not self.codec.fitted:
            self.fit_codec()

    def fit_codec(self) -> None:
        """Fit a codec fitted on data (`nn.codecs.PCACodec`) on `codec.fit_clips` of the datamodule's training
        clips, read by a loader of their own (the training stream is untouched: exact resume holds); one batch
        under fast_dev_run. Every rank reads the same clips, so every rank fits the same codec. A refined decode
        is fitted for at most the generator's own step budget (`trainer.max_steps`): a smoke test's few steps
        get a few, the quickstart's 3600 the codec's 2000."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None:
            raise ValueError(f"{type(self.codec).__name__} is fitted on the training clips: train with a datamodule "
                             f"or load a checkpoint that holds it")
        batch_size = int(getattr(datamodule, "batch_size", 8) or 8)
        wanted = batch_size if self.trainer.fast_dev_run else self.codec.fit_clips
        videos, seen = [], 0
        for batch in train_batches(datamodule, -(-wanted // batch_size) + 1, seed=2):
            videos.append(batch["video"])
            seen += batch["video"].shape[0]
            if seen >= wanted:
                break
        budget = self.trainer.max_steps if (self.trainer.max_steps or 0) > 0 else None  # -1: no step budget
        steps = self.codec.fit(videos, max_refine_steps=budget)
        refined = f", its decode refined in {steps} steps" if steps else ""
        print(f"[generation] {type(self.codec).__name__} fitted on {seen} training clips{refined}")

    def load_stage_weights(self, path: str | Path) -> None:
        """Load a previous stage's weights (not the optimizer): position tables grow, the input weights of new
        concatenated channels start at zero; the weights of conditioners the previous stage did not have, and
        the temporal layers an image model lacks (`nn.temporal.inflate`), keep their initialisation (zero
        outputs: the model starts as the previous stage)."""
        state = read_module_state(path)
        state = grow_input_channels(grow_position_tables(state, self.net, prefix="net."), self.net, prefix="net.")
        missing, unexpected = self.load_state_dict(state, strict=False)
        new = (*(f"conditioners.{name}." for name in self.conditioners), "net.guidance_embedders.",
               *(f"net.{prefix}" for prefix in getattr(self.net, "new_in_stage", ())))
        missing = [k for k in missing if not k.startswith(new) and ".temporal." not in k]
        if missing or unexpected:
            raise ValueError(f"model.init_from={path} does not fit: missing {missing[:6]}, unexpected {unexpected[:6]}")
        if hasattr(self.net, "on_stage_loaded"):  # parts derived from the loaded weights (ControlNet's copy)
            self.net.on_stage_loaded()
        print(f"[generation] initialised from {path}")

    # -- latents and conditions --------------------------------------------------------------------------------------
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Normalised latent (Enc(x) − mean) / std of pixels [B, 3, T, H, W] in [-1, 1]."""
        with torch.no_grad():
            return (self.codec.encode(video.float()) - self.latent_mean) / self.latent_std

    def to_latent(self, batch: dict[str, Any]) -> torch.Tensor:
        """X_1 of a batch: its "latent" (a cache), normalised, or the encoding of its "video"."""
        if "latent" in batch:
            return (batch["latent"].float() - self.latent_mean) / self.latent_std
        return self.encode(batch["video"])

    def from_latent(self, x1: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        """Pixels in [-1, 1] from a normalised latent, decoded in float32 (also under mixed precision)."""
        with torch.autocast(self.device.type, enabled=False):
            return self.codec.decode(x1.float() * self.latent_std + self.latent_mean, num_frames).clamp(-1.0, 1.0)

    @staticmethod
    def pixel_shape(batch: dict[str, Any]) -> tuple[int, int, int]:
        """(frames, height, width) of the batch's clips (a latent batch reads them from its meta)."""
        if "video" in batch:
            return tuple(int(s) for s in batch["video"].shape[2:])
        latent = (batch.get("meta") or [{}])[0].get("latent") or {}
        if not latent:
            raise ValueError("a latent batch needs meta[i]['latent'] with frames, height, width to be decoded")
        return int(latent["frames"]), int(latent["height"]), int(latent["width"])

    def condition_inputs(self, batch: dict[str, Any], latent_shape: tuple[int, ...], train: bool) -> dict[str, Any]:
        """Each conditioner's raw condition of the batch (parameter-free)."""
        return {name: c.inputs(batch, self.encode, latent_shape, train) for name, c in self.conditioners.items()}

    def conditions(self, raw: dict[str, Any], fps: torch.Tensor, on: dict[str, bool | torch.Tensor]) -> Conditions:
        """Conditions with each conditioner's raw value kept where `on[name]` (a bool, or a bool [B]), else null."""
        return self(None, None, embed=(raw, fps, on))

    # -- training ----------------------------------------------------------------------------------------------------
    def loss(self, batch: dict[str, Any], t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
             train: bool = False) -> torch.Tensor:
        """The objective's loss on a batch at times t (default: the time sampler's); `train` applies each
        conditioner's dropout and training-time degradations."""
        batch = {**batch, "frames": self.pixel_shape(batch)[0]}
        x1 = self.to_latent(batch)
        b = x1.shape[0]
        raw = self.condition_inputs(batch, tuple(x1.shape[1:]), train)
        on = {name: torch.rand(b) >= c.dropout for name, c in self.conditioners.items()} if train else {}
        conditions = self.conditions(raw, batch_fps(batch, b), on)
        if "frame_offset" in batch:  # images at a temporal position of their own (Movie Gen Edit stage I)
            conditions = replace(conditions, frame_offset=batch["frame_offset"].to(x1.device))
        if t is None:
            t = self.time_sampler(b, x1.device)
        path, prediction = self.objective.path, self.objective.prediction
        if noise is None:
            noise = self.objective.noise(tuple(x1.shape), device=x1.device).to(x1)
        x0, x_t = path.sample(x1, t, noise)
        return paths.flow_matching_loss(self(x_t, t, conditions), path.target(x0, x1, t, prediction))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch, train=True)
        b = len(batch["text"])
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        self.log(f"train/loss_{'image' if self.pixel_shape(batch)[0] == 1 else 'video'}", loss, batch_size=b)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Loss on the fixed grid t_k = (k + 0.5) / K with noise seeded by the batch index; cheap evaluators on
        the first batch."""
        x1 = self.to_latent(batch)
        generator = torch.Generator().manual_seed(10_000 + batch_idx)
        losses = []
        for k in range(self.val_times):
            t = torch.full((x1.shape[0],), (k + 0.5) / self.val_times, device=x1.device)
            noise = self.objective.noise(tuple(x1.shape), generator).to(x1)
            losses.append(self.loss(batch, t=t, noise=noise))
        self.log("val/loss", torch.stack(losses).mean(), prog_bar=True, batch_size=x1.shape[0])
        quick = [e for e in self.evaluators.values() if e.on_validation]
        if batch_idx == 0 and quick:
            self._evaluate(batch, quick, "val", limit=self.media.max_samples, steps=self.media.steps)

    # -- sampling ----------------------------------------------------------------------------------------------------
    def noise(self, shape: tuple[int, ...], seed: int, count: int) -> torch.Tensor:
        """[count, *shape] noise (`Objective.noise`); sample i from its own generator seeded with seed + i."""
        return torch.cat([self.objective.noise((1, *shape), torch.Generator().manual_seed(seed + i))
                          for i in range(count)])

    def guidance_passes(self, scales: Mapping[str, float]) -> tuple[list[dict[str, bool]], list[float]]:
        """The passes p_0..p_n (which conditions are on in each) and the scales s_1..s_n; one pass (all on) when
        there is nothing to guide. Conditions not named in `scales` are on in every pass."""
        scales = {name: float(s) for name, s in scales.items()}
        if all(s == 1.0 for s in scales.values()):
            return [{}], []
        names = self.guided_names(scales)
        passes = [{name: i < k for i, name in enumerate(names)} for k in range(len(names) + 1)]
        return passes, [scales[n] for n in names]

    def guided_names(self, scales: Mapping[str, float]) -> list[str]:
        """The guided conditions in pass order: `sampler.guidance_order` first, then the rest as given."""
        order = self.sampler.guidance_order
        return [n for n in order if n in scales] + [n for n in scales if n not in order] if order else list(scales)

    def guidance_input(self, scales: Mapping[str, float], batch_size: int) -> torch.Tensor:
        """The scales [B, n] in pass order, the input of a guidance-distilled backbone (`net.guidance_inputs` = n),
        which predicts the guided output in one pass with every condition on."""
        names = self.guided_names(scales)
        if len(names) != getattr(self.net, "guidance_inputs", 0):
            raise ValueError(f"model.net.guidance_inputs={getattr(self.net, 'guidance_inputs', 0)} must equal the "
                             f"number of guided conditions {names} (model.sampler.guidance)")
        return torch.tensor([float(scales[n]) for n in names], device=self.device).expand(batch_size, -1)

    @torch.no_grad()
    def generate(self, batch: dict[str, Any], frames: int, height: int, width: int, *, steps: int | None = None,
                 guidance_scales: Mapping[str, float] | None = None, schedule: str | None = None,
                 seed: int | None = None, noise: torch.Tensor | None = None, return_latent: bool = False,
                 start_time: float = 0.0, span: tuple[int, int] | None = None) -> torch.Tensor:
        """Videos [B, 3, frames, height, width] in [-1, 1] for the conditions of `batch` (at least "text"; "fps";
        what the other conditioners read); with `return_latent`, the normalised latent the solver reached. With
        start_time t_0 > 0, `noise` is X_{t_0} and the solver runs t_0 → 1 over the schedule's times above t_0
        (SDEdit: `lightning_modules.editing.sdedit`). With span=(s, e) only latent frames [s, e) of the clip are
        solved, under the whole clip's conditions cut to the span (`Conditions.window`) from the whole clip's noise
        cut to the span, and their latent is returned (Movie Gen Audio's segment-by-segment extension)."""
        if span is not None and not return_latent:
            raise ValueError("generate(span=...) returns the span's latent: pass return_latent=True")
        cfg = self.sampler
        b = len(batch["text"])
        fps = batch_fps(batch, b) if frames > 1 else torch.zeros(b)
        batch = {**batch, "fps": fps, "frames": frames}
        shape = tuple(self.codec.latent_shape(frames, height, width))
        if noise is None:
            noise = self.noise(shape, cfg.seed if seed is None else seed, b)
        x0 = noise.to(self.device, torch.float32)
        raw = self.condition_inputs(batch, shape, train=False)
        guidance_scales = cfg.guidance if guidance_scales is None else guidance_scales
        if getattr(self.net, "guidance_inputs", 0) > 0:  # guidance-distilled: one pass, the scales as an input
            scales = []
            conditions = replace(self.conditions(raw, fps, {}), guidance=self.guidance_input(guidance_scales, b))
        else:
            passes, scales = self.guidance_passes(guidance_scales)
            conditions = Conditions.cat([self.conditions(raw, fps, on) for on in passes])
        if span is not None:
            if not 0 <= span[0] < span[1] <= shape[1]:
                raise ValueError(f"generate: span={tuple(span)} must lie in the clip's {shape[1]} latent frames")
            conditions, x0 = conditions.window(*span), x0[:, :, span[0] : span[1]]

        # AVID: the window holding the middle latent frame runs first at every step and its attention guides the rest
        anchors = MiddleFrameAnchors(cfg.anchor_weight) if cfg.window and cfg.anchor_weight > 0 else None
        middle = shape[1] // 2

        def batched(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if not cfg.window:
                return self(x, t, conditions)
            spans = multidiffusion.window_spans(x.shape[2], cfg.window, cfg.overlap)
            middle_span = spans[multidiffusion.middle_window(spans, middle)]

            def one_window(piece: torch.Tensor, span: tuple[int, int]) -> torch.Tensor:
                if anchors is not None and span == middle_span:
                    anchors.record(middle - span[0])
                elif anchors is not None:
                    anchors.guide()
                return self(piece, t, conditions.window(*span))

            return multidiffusion.fuse_windows(one_window, x, cfg.window, cfg.overlap, dim=2, weighting=cfg.weighting,
                                               first=middle if anchors is not None else None)

        model_fn = guidance.guided(batched, scales, cfg.guidance_interval) if scales else batched
        grid = timesteps.schedule(schedule or cfg.schedule, steps or cfg.steps, cfg.emulated_steps, shift=cfg.shift,
                                  train_steps=getattr(self.objective.path, "num_train_steps", 1000))
        if start_time > 0:
            grid = torch.cat([grid.new_tensor([float(start_time)]), grid[grid > start_time]])
        install_anchors(self.net, anchors)
        try:
            x1 = solvers.solve(cfg.solver, model_fn, x0, grid, path=self.objective.path,
                               prediction=self.objective.prediction)
        finally:
            install_anchors(self.net, None)
        return x1 if return_latent else self.from_latent(x1, frames)

    def previews(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The conditioners' previews of the batch (the upsampler's bilinear input, a masked video, ...)."""
        batch = {**batch, "frames": self.pixel_shape(batch)[0]} if "video" in batch else batch
        out: dict[str, torch.Tensor] = {}
        for c in self.conditioners.values():
            out.update(c.preview(batch))
        return out

    def _sample_batch(self, batch: dict[str, Any], limit: int | None = None, **kwargs: Any) -> torch.Tensor:
        """Samples for (the first `limit` items of) a dataset batch, at its clips' size."""
        n = len(batch["text"]) if limit is None else min(limit, len(batch["text"]))
        part = {k: v[:n] if isinstance(v, torch.Tensor | list | tuple) else v for k, v in batch.items()}
        frames, height, width = self.pixel_shape(part)
        return self.generate(part, frames, height, width, **kwargs), part

    @torch.no_grad()
    def media_samples(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """{"sample": generated clips for the batch's conditions, "real": its clips, and the previews}."""
        sample, part = self._sample_batch(batch, self.media.max_samples, steps=self.media.steps)
        out = {"sample": sample}
        if "video" in part:
            out["real"] = part["video"].float()
            out.update(self.previews(part))
        return out

    # -- evaluation: the test loop after fit, and task=evaluate -------------------------------------------------------
    def _evaluate(self, batch: dict[str, Any], evaluators: list[Evaluator], stage: str, limit: int | None = None,
                  **kwargs: Any) -> None:
        """Sample the batch, update `evaluators`; at validation also compute and log them at once."""
        sample, part = self._sample_batch(batch, limit, **kwargs)
        with torch.autocast(self.device.type, enabled=False):  # the judges score in float32 whatever trains
            self._update_evaluators(sample.float(), part, evaluators, stage)

    def _update_evaluators(self, sample: torch.Tensor, part: dict[str, Any], evaluators: list[Evaluator],
                           stage: str) -> None:
        if "video" not in part and "latent" in part:
            # a latent cache holds no pixels: the evaluators' real clips are its latents decoded (the codec's ceiling)
            part = {**part, "video": self.from_latent(self.to_latent(part), self.pixel_shape(part)[0])}
        extras = self.previews(part) if "video" in part else {}
        if stage == "val":
            for e in evaluators:
                e.start(self, self.trainer)
                e.update(sample, part, extras)
                for name, value in e.compute().items():
                    self.log(f"val/{name}", value, batch_size=sample.shape[0])
            return
        for e in evaluators:
            e.update(sample, part, extras)

    def on_test_start(self) -> None:
        for e in self.evaluators.values():
            e.start(self, self.trainer)

    def test_seed(self, batch_idx: int) -> int:
        """The sampling seed of test batch `batch_idx` (its sample i then uses test_seed + i)."""
        return self.sampler.seed + 1000 * batch_idx

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, list(self.evaluators.values()), self._stage_prefix, seed=self.test_seed(batch_idx))

    def on_test_epoch_end(self) -> None:
        for e in self.evaluators.values():
            for name, value in e.compute().items():
                self.log(f"{self._stage_prefix}/{name}", value)

    # -- custom tasks ------------------------------------------------------------------------------------------------
    def run_task(self, name: str, trainer: L.Trainer, datamodule: L.LightningDataModule | None, cfg: Any) -> Any:
        """`task=sample` (prompts and/or input videos → videos), `task=evaluate` (the test loop as eval/*) and
        `task=ensemble` (Animated Stickers' teachers → judged candidates, gallery, selected shards),
        `task=inpaint` (AVID: a video, a mask and a prompt → the inpainted video) and `task=edit` (Movie Gen Edit:
        a video and an instruction → the edited video)."""
        if name == "sample":
            return self.sample_to_files(trainer)
        if name == "edit":  # Movie Gen Edit: a video and an instruction → the edited video (lightning_modules.editing)
            from lightning_modules.editing import edit_to_files  # it builds on this module

            return edit_to_files(self, trainer, dict(cfg.get("edit") or {}))
        if name == "inpaint":  # AVID: any-length text-guided video inpainting (lightning_modules.inpainting)
            from lightning_modules.inpainting import inpaint_to_files  # it builds on this module

            if "inpaint" not in cfg:
                raise ValueError("task=inpaint needs an `inpaint:` config (see conf/experiment/avid_structure.yaml)")
            return inpaint_to_files(self, trainer, dict(cfg.inpaint))
        if name == "ensemble":  # Animated Stickers: teachers' clips judged, reviewed, selected (lightning_modules.stickers)
            from lightning_modules.stickers import TeacherEnsemble  # it builds on this module

            if "ensemble" not in cfg:
                raise ValueError("task=ensemble needs an `ensemble:` config (see conf/experiment/sticker_ensemble.yaml)")
            options = {k: (dict(v) if hasattr(v, "items") else v) for k, v in cfg.ensemble.items()}
            options["teachers"] = {k: dict(v) for k, v in cfg.ensemble.teachers.items()}
            return TeacherEnsemble(self, **options).run(trainer, datamodule)
        if name == "evaluate":
            self._stage_prefix = "eval"
            try:
                return trainer.test(self, datamodule=datamodule)
            finally:
                self._stage_prefix = "test"
        raise ValueError(f"task={name!r} is not offered by {type(self).__name__}; it supports fit, validate, test, "
                         "sample, evaluate, ensemble, inpaint, edit")

    def sample_requests(self) -> list[dict[str, Any]]:
        """One batch of one item per request of `task=sample`: each prompt (× per_prompt), each input video."""
        cfg = self.sample_cfg
        requests: list[dict[str, Any]] = []
        if cfg.prompts:
            path = Path(cfg.prompts)
            if not path.is_file():
                raise FileNotFoundError(f"model.sample.prompts={cfg.prompts}: no such file")
            prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            if not prompts:
                raise ValueError(f"model.sample.prompts={cfg.prompts} holds no prompts")
            requests += [{"text": [p], "fps": torch.tensor([cfg.fps])} for p in prompts for _ in range(cfg.per_prompt)]
        if cfg.inputs:
            requests += read_inputs(cfg.inputs, cfg.fps)
        if not requests:
            raise ValueError("task=sample needs model.sample.prompts=<a text file, one prompt per line> and/or "
                             "model.sample.inputs=<a video file or a folder of videos>")
        if cfg.reference:
            reference = read_reference_image(cfg.reference)
            if not any(isinstance(c, ReferenceImage) for c in self.conditioners.values()):
                raise ValueError(f"model.sample.reference={cfg.reference}: this model has no reference conditioner "
                                 "(model.conditioners.<name>: ReferenceImage, e.g. conf/model/pt2v_tiny.yaml)")
            requests = [{**r, "reference": reference} for r in requests]
        return requests

    def output_size(self, request: dict[str, Any]) -> tuple[int, int, int]:
        """(frames, H, W) to generate for a request: a conditioner's (the upsampler: r × its input), else the
        input video's, else the config's."""
        for c in self.conditioners.values():
            size = c.target_size(request) if hasattr(c, "target_size") else None
            if size is not None:
                return size
        if "source" in request:
            return tuple(int(s) for s in request["source"].shape[2:])
        cfg = self.sample_cfg
        return cfg.frames, cfg.height, cfg.width

    @torch.no_grad()
    def sample_to_files(self, trainer: L.Trainer) -> list[Path]:
        """Write one clip per request to `sample.output_dir` (default <run dir>/samples); log them to MLflow."""
        cfg = self.sample_cfg
        self.to(trainer.strategy.root_device).eval()
        folder = Path(cfg.output_dir) if cfg.output_dir else Path(trainer.default_root_dir) / "samples"
        requests = self.sample_requests()
        written: list[Path] = []
        if cfg.reference:  # the identity the clips show, beside them
            folder.mkdir(parents=True, exist_ok=True)
            written.append(Path(shutil.copyfile(cfg.reference, folder / f"reference{Path(cfg.reference).suffix}")))
        for index, request in enumerate(requests):
            frames, height, width = self.output_size(request)
            if "image" in request:  # a sticker: resized to the clip's frame size
                request = {**request, "image": resize_video(request["image"][:, :, None], height, width)[:, :, 0]}
            video = self.generate(request, frames, height, width, seed=self.sampler.seed + index)[0]
            caption = request["text"][0]
            stem = folder / f"{index:03d}_{slug(request.get('name') or caption)}"
            written += write_clip(stem, video, caption, float(request["fps"][0]))
            if "image" in request:  # an animated sticker also as a looping GIF
                written.append(write_gif(stem.with_suffix(".gif"), video, float(request["fps"][0])))
            print(f"[generation] {index + 1}/{len(requests)} sampled: {stem.name}")
        log_artifacts(trainer, written, "samples")
        for logger in trainer.loggers:
            if hasattr(logger, "run_id") and hasattr(logger.experiment, "log_dict"):
                logger.experiment.log_dict(logger.run_id, asdict(self.sampler), "samples/sampling.json")
                logger.experiment.log_text(logger.run_id, "\n".join(r["text"][0] for r in requests) + "\n",
                                           "samples/prompts.txt")
        print(f"[generation] wrote {len(requests)} samples to {folder}")
        return written


VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def read_reference_image(location: str) -> torch.Tensor:
    """A reference image file → [1, 3, H, W] in [-1, 1]."""
    path = Path(location)
    if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
        raise FileNotFoundError(f"model.sample.reference={location}: no image file ({', '.join(IMAGE_SUFFIXES)})")
    return frames_to_video(torch.from_numpy(decode_image(path.read_bytes()))[None])[:, 0][None]


def read_inputs(location: str, fps: float = 8.0) -> list[dict[str, Any]]:
    """Requests from a media file or a folder of them, each with the caption in <name>.txt beside it (or ""):
    a video → {"source": [1, 3, T, H, W] in [-1, 1], "fps": [its rate]} (e.g. the upsampler's input); an image →
    {"image": [1, 3, H, W] in [-1, 1], "fps": [fps]} (a sticker to animate); both with "text" and "name"."""
    path = Path(location)
    suffixes = VIDEO_SUFFIXES + IMAGE_SUFFIXES
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in suffixes) if path.is_dir() else [path]
    if not path.exists() or not files:
        raise FileNotFoundError(f"model.sample.inputs={location}: no video or image file there ({', '.join(suffixes)})")
    requests = []
    for file in files:
        caption_file = file.with_suffix(".txt")
        caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.is_file() else ""
        request: dict[str, Any] = {"text": [caption], "name": file.stem}
        if file.suffix.lower() in IMAGE_SUFFIXES:
            image = frames_to_video(torch.from_numpy(decode_image(file.read_bytes()))[None])  # [3, 1, H, W]
            request |= {"image": image[:, 0][None], "fps": torch.tensor([float(fps)])}
        else:
            clip = decode_video(file)
            request |= {"source": frames_to_video(torch.from_numpy(clip.frames))[None],
                        "fps": torch.tensor([clip.fps])}
        requests.append(request)
    return requests
