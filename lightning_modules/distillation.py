"""The fast student of Animated Stickers (arXiv 2402.06088, A.7 [U]): guidance distillation (Meng et al., CVPR
2023) and step distillation in one objective, from a frozen teacher into a smaller student.

The teacher T (a `GenerationModule`, e.g. the stage-2 sticker model) samples with many Euler steps of n + 1
network passes each (multi-condition guidance, `generative.guidance`: for stickers p_0 = neither condition,
p_1 = image, p_2 = image + text). The student S is a `GenerationModule` whose backbone takes the n guidance scales
as an input (`net.guidance_inputs` = n, added to its time embedding, zero at initialisation): it samples with
`student_steps` steps of ONE pass with every condition on. Per training sample (x_1 its normalised latent):

    t_0 < t_1 < ... < t_S        the student's schedule (`sampler.schedule`, S = student_steps = sampler.steps)
    k ~ U{0, ..., S − 1},   x_0 ~ N(0, I),   x_{t_k} = α(t_k)·x_1 + σ(t_k)·x_0          (the path's sample)
    s = (s_1, ..., s_n),    s_i ~ U[lo_i, hi_i]        one scale per guided condition, in pass order

    teacher, m = teacher_steps // student_steps Euler sub-steps of h = (t_{k+1} − t_k) / m under full guidance:
        ũ(y, τ) = u_0 + Σ_i s_i·(u_i − u_{i−1})     u_i = T's velocity at (y, τ) with the first i guided conditions on
        y_0 = x_{t_k},   y_{j+1} = y_j + h·ũ(y_j, t_k + j·h),   j = 0 .. m − 1
    target:   v* = (y_m − x_{t_k}) / (t_{k+1} − t_k) = (1/m)·Σ_j ũ(y_j, t_k + j·h)
    student:  v  = S(x_{t_k}, t_k, all conditions on, guidance = s)      (converted to a velocity)

    loss = ‖v − v*‖²  +  data_weight · ‖S(x_t, t, C, 1) − target_t‖²          (distillation_space: velocity)
    loss = ‖S(...) − P(v*)‖²  +  data_weight · ‖S(x_t, t, C, 1) − target_t‖²   (distillation_space: prediction)

where P converts the velocity v* at (x_{t_k}, t_k) into the student's prediction type (`objective.prediction`;
for data prediction on the flow-matching path with σ_min = 0, P(v*) = x_{t_k} + (1 − t_k)·v*). Both are the same
target; they weigh the steps differently. In velocity space a data-predicting student's error is divided by
(1 − t_k), so the last steps near the data dominate the loss (~500x the first on the shifted 8-step schedule);
in the prediction's own space every step counts as the flow-matching loss on the batch counts it.

One Euler step of the student with v* from x_{t_k} lands exactly where the teacher's m guided sub-steps land, so
the student's S-step one-pass sampler learns to follow the teacher's S·m-step (n + 1)-pass sampler: (n + 1)·m
times fewer network evaluations (18 for the stickers' 3 passes and 48 / 8 steps), before the smaller architecture
is counted. The second term is the ordinary flow-matching loss on the batch (conditions dropped at their training
rates, scales 1: the conditional model), so the student is also fine-tuned on the clips it is given (the ensemble
of teachers' selected set, `lightning_modules.stickers`).

The teacher is frozen (eval mode, no gradients, not in the optimizer) and is not saved in the student's
checkpoints: its weights come from `teacher_from` (a checkpoint, or a folder whose newest **/checkpoints/last.ckpt
is used; its EMA weights when it has them) whenever a fit starts or resumes. Teacher and student must share the
codec, the latent normalisation and the path (checked). Both read the conditions of the batch with their own
conditioners (the student has its own text encoder).

Logged: train/loss (the sum), train/loss_distill, train/loss_data; val/loss (the student's flow-matching loss)
and val/loss_distill on fixed draws.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_modules.base import OptimizerFactory
from lightning_modules.checkpoint_io import newest_checkpoint, read_module_state
from lightning_modules.conditioning import Conditioner, Conditions
from lightning_modules.conditioning.text import batch_fps
from lightning_modules.generation import GenerationModule
from lightning_modules.generative import guidance, paths, timesteps

TEACHER = "teacher."  # the prefix of the teacher's tensors, left out of the student's state dict


class DistillationModule(GenerationModule):
    """A student `GenerationModule` trained against a frozen teacher; see the module docstring.

    Args:
        net, codec, conditioners, optimizer, **kwargs: the student (`GenerationModule`'s arguments); its
            `net.guidance_inputs` must equal the number of conditions in `sampler.guidance`.
        teacher: the teacher `GenerationModule` (built from a nested model config).
        teacher_from: the teacher's weights: a checkpoint, or a folder (its newest **/checkpoints/last.ckpt). A
            missing one is an error when a fit starts, except under `trainer.fast_dev_run`.
        student_steps: S, the student's sampling steps (= sampler.steps).
        teacher_steps: the teacher's Euler steps over the whole schedule (a multiple of S).
        guidance_ranges: guided condition → [lo, hi], the range the scale is drawn from (uniformly).
        data_weight: the weight of the flow-matching loss on the batch (0: distillation only).
        distillation_space: "velocity" (‖v − v*‖²) or "prediction" (‖S − P(v*)‖², in the space the student
            predicts, as its flow-matching loss is measured); the same for a velocity-predicting student.
        start_from_teacher: when a fit starts, every student tensor that the teacher has too (same name and shape)
            takes the teacher's value: a student with the teacher's widths and fewer layers starts as the teacher
            pruned (`copy_teacher_weights`). A resumed fit then restores the student's own checkpoint over it.
    """

    def __init__(self, net: nn.Module, codec: nn.Module, conditioners: Mapping[str, Conditioner],
                 optimizer: OptimizerFactory, *, teacher: GenerationModule, teacher_from: str | None = None,
                 student_steps: int = 8, teacher_steps: int = 48,
                 guidance_ranges: Mapping[str, Sequence[float]] | None = None, data_weight: float = 0.5,
                 start_from_teacher: bool = False, distillation_space: str = "velocity", **kwargs: Any) -> None:
        super().__init__(net, codec, conditioners, optimizer, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False)
        self.teacher_from, self.data_weight = teacher_from, float(data_weight)
        if distillation_space not in ("velocity", "prediction"):
            raise ValueError(f"model.distillation_space={distillation_space!r} must be 'velocity' or 'prediction'")
        self.distillation_space = distillation_space
        self.start_from_teacher = bool(start_from_teacher)
        self.student_steps, self.teacher_steps = int(student_steps), int(teacher_steps)
        self.guided = self.guided_names(self.sampler.guidance)
        ranges = {"image": (1.0, 3.0), "text": (1.0, 8.0)} if guidance_ranges is None else guidance_ranges
        self.guidance_ranges = {name: (float(lo), float(hi)) for name, (lo, hi) in ranges.items()}
        self._check_distillation()
        self._latents_checked = False

    def _check_distillation(self) -> None:
        s, m, teacher = self.student_steps, self.teacher_steps, self.teacher
        if s < 1 or m < s or m % s:
            raise ValueError(f"model.teacher_steps={m} must be a multiple of model.student_steps={s} >= 1")
        if self.sampler.steps != s:
            raise ValueError(f"model.sampler.steps={self.sampler.steps} must equal model.student_steps={s}")
        if getattr(self.net, "guidance_inputs", 0) != len(self.guided):
            raise ValueError(f"model.net.guidance_inputs={getattr(self.net, 'guidance_inputs', 0)} must equal the "
                             f"number of guided conditions {self.guided} (model.sampler.guidance)")
        if sorted(self.guidance_ranges) != sorted(self.guided):
            raise ValueError(f"model.guidance_ranges names {sorted(self.guidance_ranges)}; it must name the guided "
                             f"conditions {sorted(self.guided)}")
        if any(lo > hi for lo, hi in self.guidance_ranges.values()):
            raise ValueError(f"model.guidance_ranges={self.guidance_ranges}: every range must be [lo, hi], lo <= hi")
        missing = sorted(set(self.guided) - set(teacher.conditioners))
        if missing:
            raise ValueError(f"model.teacher has no conditioners {missing} (guided by the student)")
        if type(teacher.codec) is not type(self.codec) or teacher.codec.latent_channels != self.codec.latent_channels:
            raise ValueError(f"model.teacher.codec ({type(teacher.codec).__name__}, {teacher.codec.latent_channels} "
                             f"channels) must be the student's ({type(self.codec).__name__}, "
                             f"{self.codec.latent_channels} channels)")
        self._check_normalisation()
        if repr(teacher.objective.path) != repr(self.objective.path):
            raise ValueError(f"model.teacher.objective.path={teacher.objective.path!r} must be the student's "
                             f"{self.objective.path!r}")

    def _check_normalisation(self) -> None:
        t = self.teacher
        if not (torch.equal(t.latent_mean.cpu(), self.latent_mean.cpu())
                and torch.equal(t.latent_std.cpu(), self.latent_std.cpu())):
            raise ValueError(f"model.teacher's latent normalisation (mean {t.latent_mean.flatten().tolist()}, std "
                             f"{t.latent_std.flatten().tolist()}) must be the student's (model.latent_mean, latent_std)")

    def _check_latents(self, batch: dict[str, Any], x1: torch.Tensor) -> None:
        """Once: the teacher's latent of the batch is the student's (same codec weights and normalisation)."""
        if self._latents_checked:
            return
        if not torch.allclose(self.teacher.to_latent(batch), x1, atol=1e-5, rtol=1e-4):
            raise ValueError("model.teacher encodes the batch to other latents than the student: the codec (or its "
                             "checkpoint) and the latent normalisation must be the same")
        self._latents_checked = True

    # -- the frozen teacher ------------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> DistillationModule:
        super().train(mode)
        self.teacher.eval()
        return self

    def shard_units(self) -> list[nn.Module]:
        """The student's units, and the teacher as one unit (its forward gathers its weights under FSDP2; not yet
        run sharded)."""
        return [*super().shard_units(), self.teacher]

    def state_dict(self, *, destination: dict | None = None, prefix: str = "", keep_vars: bool = False) -> dict:
        """The student's tensors only: the teacher is loaded from `teacher_from`, not saved with the student."""
        state = super().state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
        for key in [k for k in state if k.startswith(prefix + TEACHER)]:
            del state[key]
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """As `nn.Module.load_state_dict`; the teacher keeps its weights where `state_dict` has none for it."""
        own = {TEACHER + k: v for k, v in self.teacher.state_dict(keep_vars=True).items()}
        return super().load_state_dict({**own, **state_dict}, strict=strict, assign=assign)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage != "fit":
            return
        try:
            if not self.teacher_from:
                raise FileNotFoundError("it is not set")
            path = newest_checkpoint(self.teacher_from)
        except FileNotFoundError as exc:
            if self._trainer is not None and self._trainer.fast_dev_run:
                print(f"[distillation] fast_dev_run: model.teacher_from={self.teacher_from}: {exc}; the teacher keeps "
                      "its initialisation")
                return
            raise FileNotFoundError(f"model.teacher_from={self.teacher_from}: {exc}") from None
        self.load_teacher(path)
        if self.start_from_teacher:
            self.copy_teacher_weights()

    def load_teacher(self, path: str | Path) -> None:
        """The teacher's weights from a checkpoint: its EMA weights when it has them, else its training weights."""
        state = read_module_state(path, ema=True)
        missing, unexpected = self.teacher.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"model.teacher does not fit model.teacher_from={path}: missing {missing[:6]}, "
                             f"unexpected {unexpected[:6]}")
        self._check_normalisation()
        print(f"[distillation] teacher loaded from {path}")

    def copy_teacher_weights(self) -> int:
        """Every student tensor with a same-named, same-shaped teacher tensor takes the teacher's value; the rest
        (e.g. the guidance embeddings, whose last layers start at zero) keep theirs. Returns how many were copied."""
        own, teacher = self.state_dict(), self.teacher.state_dict()
        shared = {k: v for k, v in teacher.items() if k in own and own[k].shape == v.shape}
        if not shared:
            raise ValueError("model.start_from_teacher: the student shares no tensor (name and shape) with the teacher")
        self.load_state_dict(shared, strict=False)
        print(f"[distillation] student started from the teacher: {len(shared)} of its {len(own)} tensors copied")
        return len(shared)

    # -- the objective -----------------------------------------------------------------------------------------------
    def conditions(self, raw: dict[str, Any], fps: torch.Tensor, on: dict[str, bool | torch.Tensor]) -> Conditions:
        """The student's conditions, with the guidance input 1 for every scale (the conditional model); the
        distillation and sampling put the drawn or asked scales in its place."""
        conditions = super().conditions(raw, fps, on)
        return replace(conditions, guidance=torch.ones(fps.shape[0], len(self.guided), device=self.device))

    def student_times(self) -> torch.Tensor:
        """t_0 < ... < t_S: the student's sampling schedule [S + 1] (what `generate` integrates over)."""
        cfg = self.sampler
        return timesteps.schedule(cfg.schedule, self.student_steps, cfg.emulated_steps, shift=cfg.shift,
                                  train_steps=getattr(self.objective.path, "num_train_steps", 1000)).float()

    def draw_scales(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """s [B, n], s_i ~ U[lo_i, hi_i], in pass order."""
        lo, hi = torch.tensor([self.guidance_ranges[n] for n in self.guided]).unbind(-1)
        return (lo + (hi - lo) * torch.rand(batch_size, len(self.guided), generator=generator)).to(self.device)

    def teacher_velocity(self, conditions: Conditions, x: torch.Tensor, t: torch.Tensor,
                         scales: torch.Tensor) -> torch.Tensor:
        """ũ(x, t) = u_0 + Σ_i s_i·(u_i − u_{i−1}) with per-sample scales [B, n]: one teacher call on the batch
        repeated n + 1 times, pass-major (`conditions` holds the passes' conditions in that layout)."""
        teacher, b, passes = self.teacher, x.shape[0], scales.shape[1] + 1
        x_rep, t_rep = torch.cat([x] * passes), t.repeat(passes)
        out = teacher(x_rep, t_rep, conditions)
        u = teacher.objective.path.convert(out, x_rep, t_rep, teacher.objective.prediction, "velocity")
        per_sample = [s.view(-1, *([1] * (x.ndim - 1))) for s in scales.to(x).unbind(1)]
        return guidance.combine(u.split(b), per_sample)

    @torch.no_grad()
    def teacher_target(self, batch: dict[str, Any], x_t: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
                       scales: torch.Tensor) -> torch.Tensor:
        """v* = (1/m)·Σ_j ũ(y_j, t + j·h): the teacher's m guided Euler sub-steps from x_t [B, ...] at t [B] to
        t_next [B], as an average velocity (see the module docstring). `batch` must hold "frames"."""
        teacher, m = self.teacher, self.teacher_steps // self.student_steps
        raw = teacher.condition_inputs(batch, tuple(x_t.shape[1:]), train=False)
        fps = batch_fps(batch, x_t.shape[0])
        passes = [{name: i < k for i, name in enumerate(self.guided)} for k in range(len(self.guided) + 1)]
        conditions = Conditions.cat([teacher.conditions(raw, fps, on) for on in passes])
        h = (t_next - t) / m
        step = h.view(-1, *([1] * (x_t.ndim - 1)))
        y, total = x_t, torch.zeros_like(x_t)
        for j in range(m):
            u = self.teacher_velocity(conditions, y, t + j * h, scales)
            y, total = y + step * u, total + u
        return total / m

    def distillation_loss(self, batch: dict[str, Any], k: torch.Tensor | None = None,
                          noise: torch.Tensor | None = None, scales: torch.Tensor | None = None) -> torch.Tensor:
        """‖v − v*‖² (or ‖S − P(v*)‖², `distillation_space`) on a batch, at student steps k [B] (default: drawn),
        noise x_0 and scales s [B, n]."""
        batch = {**batch, "frames": self.pixel_shape(batch)[0]}
        x1 = self.to_latent(batch)
        self._check_latents(batch, x1)
        b, grid = x1.shape[0], self.student_times().to(x1.device)
        k = torch.randint(0, self.student_steps, (b,)) if k is None else k
        t, t_next = grid[k.to(x1.device)], grid[k.to(x1.device) + 1]
        _, x_t = self.objective.path.sample(x1, t, noise)
        scales = self.draw_scales(b) if scales is None else scales.to(self.device)
        target = self.teacher_target(batch, x_t, t, t_next, scales)
        raw = self.condition_inputs(batch, tuple(x1.shape[1:]), train=False)
        conditions = replace(self.conditions(raw, batch_fps(batch, b), {}), guidance=scales)
        path, prediction = self.objective.path, self.objective.prediction
        if self.distillation_space == "prediction":
            return paths.flow_matching_loss(self(x_t, t, conditions), path.convert(target, x_t, t, "velocity",
                                                                                   prediction))
        return paths.flow_matching_loss(path.convert(self(x_t, t, conditions), x_t, t, prediction, "velocity"), target)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss_distill = self.distillation_loss(batch)
        loss_data = self.loss(batch, train=True) if self.data_weight > 0 else torch.zeros((), device=self.device)
        loss = loss_distill + self.data_weight * loss_data
        b = len(batch["text"])
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        self.log("train/loss_distill", loss_distill, batch_size=b)
        self.log("train/loss_data", loss_data, batch_size=b)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """The student's flow-matching val/loss (`GenerationModule`), and val/loss_distill at fixed draws: every
        student step in turn, noise and scales seeded by the batch index."""
        super().validation_step(batch, batch_idx)
        x1 = self.to_latent(batch)
        generator = torch.Generator().manual_seed(20_000 + batch_idx)
        k = torch.arange(x1.shape[0]) % self.student_steps
        noise = torch.randn(x1.shape, generator=generator).to(x1)
        loss = self.distillation_loss(batch, k, noise, self.draw_scales(x1.shape[0], generator))
        self.log("val/loss_distill", loss, batch_size=x1.shape[0])
