"""The fast sticker student (lightning_modules/distillation.py): the UNet's guidance input starts at zero, a
guidance-input backbone samples with one pass per step and gets the scales in pass order, the distillation target
against a teacher whose guided Euler sub-steps are computed by hand, the teacher's weights (EMA preferred) and its
absence from the student's checkpoints, and a short distillation that lowers the distillation loss and moves the
student's 8-step one-pass sampler toward the teacher's 48-step three-pass sampler."""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_modules.checkpoint_io import EMA_FORMAT
from lightning_modules.conditioning import Conditions, MotionBucket, StillImage, Text
from lightning_modules.distillation import DistillationModule
from lightning_modules.generation import GenerationModule
from lightning_modules.nn.codecs import PixelCodec
from lightning_modules.nn.text import TextConditioner, WordEncoder
from lightning_modules.nn.unet import video_unet

pytestmark = pytest.mark.usefixtures("one_thread")

DIM, C = 32, 12                          # width; latent channels of PixelCodec(2)
FRAMES, SIZE = 4, 8                      # clips of 4 frames of 8x8 pixels -> latents [12, 4, 4, 4]
GUIDANCE = {"text": 4.0, "image": 1.5}   # written text first: the pass order comes from guidance_order
ORDER = ["image", "text"]                # p0 = neither, p1 = image, p2 = image + text
SIGMA_MIN = 1e-5                         # FlowMatchingPath's default


def conditioners() -> dict:
    text = Text(TextConditioner({"word": WordEncoder(dim=DIM, depth=1, heads=4, max_length=16, buckets=64)}, dim=DIM),
                dropout=0.05)
    return {"text": text, "image": StillImage(C, frame="middle", dropout=0.05),
            "motion": MotionBucket(DIM, default=3, dropout=0.1)}


def unet(channels: tuple[int, int], guidance_inputs: int = 0, attention_levels: tuple[int, ...] = (1,)) -> nn.Module:
    return video_unet(in_channels=C, dim=DIM, channels=channels, attention_levels=attention_levels, heads=4, groups=8,
                      cond_channels=C, pooled_text=True, guidance_inputs=guidance_inputs)


def sampler(steps: int) -> dict:
    return dict(steps=steps, schedule="shifted", shift=3.0, guidance=GUIDANCE, guidance_order=ORDER)


def sticker_model(guidance_inputs: int = 0, steps: int = 48, seed: int = 0) -> GenerationModule:
    """A tiny sticker model (sticker_tiny's wiring): the teacher's architecture."""
    torch.manual_seed(seed)
    return GenerationModule(unet((16, 32), guidance_inputs), PixelCodec(2), conditioners(),
                            optimizer=partial(torch.optim.AdamW, lr=2e-3), latent_std=0.5, sampler=sampler(steps))


def student(teacher: GenerationModule, **kwargs) -> DistillationModule:
    """A smaller student (channels [8, 16]) with the two guidance inputs, 8 steps."""
    torch.manual_seed(1)
    options = dict(latent_std=0.5, sampler=sampler(8)) | kwargs
    return DistillationModule(unet((8, 16), guidance_inputs=2), PixelCodec(2), conditioners(),
                              partial(torch.optim.AdamW, lr=3e-3), teacher=teacher, **options)


def perturb(module: nn.Module, scale: float = 0.05) -> None:
    """Random non-zero weights everywhere (zero-initialised layers included), so outputs depend on all inputs."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


def clips(b: int = 4) -> dict:
    g = torch.Generator().manual_seed(2)
    captions = ["a red circle bounces", "a blue star spins", "a green square slides", "a yellow heart pulses"]
    return {"video": torch.rand(b, 3, FRAMES, SIZE, SIZE, generator=g) * 2 - 1, "text": captions[:b],
            "fps": torch.full((b,), 8.0), "meta": [{"motion_bucket": i % 8} for i in range(b)]}


# -- the guidance input ----------------------------------------------------------------------------------------------
def test_guidance_embedding_starts_at_zero() -> None:
    """Same weights, guidance_inputs 2 vs 0: the same output for any scales until the embedding's last layer moves."""
    torch.manual_seed(0)
    plain, guided = unet((16, 32)), unet((16, 32), guidance_inputs=2)
    perturb(plain)
    missing, unexpected = guided.load_state_dict(plain.state_dict(), strict=False)
    assert missing and all(k.startswith("guidance_embedders.") for k in missing) and not unexpected
    x, t = torch.randn(2, C, FRAMES, 4, 4), torch.tensor([0.2, 0.7])
    context, mask, cond = torch.randn(2, 5, DIM), torch.ones(2, 5, dtype=torch.bool), torch.randn(2, C, FRAMES, 4, 4)
    scales = torch.tensor([[1.5, 4.0], [3.0, 1.0]])
    with torch.no_grad():
        expected = plain(x, t, context, mask, cond=cond)
        assert expected.abs().mean() > 1e-3
        assert torch.equal(guided(x, t, context, mask, cond=cond, guidance=scales), expected)
        assert torch.equal(guided(x, t, context, mask, cond=cond), expected)
        perturb(guided.guidance_embedders)  # once trained, each scale steers the output
        out = guided(x, t, context, mask, cond=cond, guidance=scales)
        assert not torch.allclose(out, expected, atol=1e-4)
        assert not torch.allclose(out, guided(x, t, context, mask, cond=cond, guidance=scales.flip(1)), atol=1e-4)
    with pytest.raises(ValueError, match="guidance_inputs=2"):
        guided(x, t, context, mask, cond=cond, guidance=scales[:, :1])
    with pytest.raises(ValueError, match="guidance_inputs=0"):
        plain(x, t, context, mask, cond=cond, guidance=scales)


def test_conditions_carry_guidance_only_when_set() -> None:
    a = Conditions(concat=torch.zeros(2, 1, 3, 1, 1), fps=torch.zeros(2), guidance=torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    passes = Conditions.cat([a, replace(a, guidance=a.guidance + 10)])
    assert passes.guidance.tolist() == [[1, 2], [3, 4], [11, 12], [13, 14]]
    assert torch.equal(passes.window(1, 2).guidance, passes.guidance)
    assert torch.equal(a.backbone_kwargs()["guidance"], a.guidance)
    assert "guidance" not in Conditions(fps=torch.zeros(2)).backbone_kwargs()  # the DiT takes no guidance


def test_student_initialised_from_the_teacher_starts_as_its_conditional_model(tmp_path) -> None:
    """`init_from` a teacher checkpoint: the guidance embeddings are new (zero), so the student's one guided pass
    is the teacher's pass with every condition on (its sample with all scales 1), whatever the scales."""
    teacher = sticker_model(steps=4)
    perturb(teacher)
    torch.save({"state_dict": teacher.state_dict()}, tmp_path / "teacher.ckpt")
    same = sticker_model(guidance_inputs=2, steps=4, seed=5)
    same.load_stage_weights(tmp_path / "teacher.ckpt")
    batch = clips(2)
    conditional = teacher.generate(batch, FRAMES, SIZE, SIZE, guidance_scales={"image": 1.0, "text": 1.0},
                                   return_latent=True)
    assert torch.allclose(same.generate(batch, FRAMES, SIZE, SIZE, return_latent=True), conditional, atol=1e-6)
    guided = teacher.generate(batch, FRAMES, SIZE, SIZE, return_latent=True)
    assert not torch.allclose(guided, conditional, atol=1e-3)  # the teacher's 3-pass guidance differs


def test_a_pruned_student_starts_from_the_teachers_weights() -> None:
    """`start_from_teacher`: a student with the teacher's widths but no attention at level 1 takes every tensor the
    teacher has (same name and shape); only its guidance embeddings keep their initialisation."""
    teacher = sticker_model()
    perturb(teacher)
    torch.manual_seed(1)
    pruned = DistillationModule(unet((16, 32), guidance_inputs=2, attention_levels=()), PixelCodec(2), conditioners(),
                                partial(torch.optim.AdamW, lr=3e-3), teacher=teacher, latent_std=0.5,
                                sampler=sampler(8), start_from_teacher=True)
    copied = pruned.copy_teacher_weights()
    own, ref = pruned.state_dict(), teacher.state_dict()
    fresh = [k for k in own if k not in ref]
    assert fresh and all(k.startswith("net.guidance_embedders.") for k in fresh)
    assert copied == len(own) - len(fresh)
    assert all(torch.equal(own[k], ref[k]) for k in own if k in ref)
    assert sum(v.numel() for v in own.values()) < sum(v.numel() for v in ref.values())  # the level-1 attention is gone


def test_guidance_input_backbone_runs_one_pass_per_step() -> None:
    calls: list[tuple[int, torch.Tensor | None]] = []

    def record(module, args, kwargs, out) -> None:
        calls.append((args[0].shape[0], kwargs.get("guidance")))

    batch = clips(3)
    module = sticker_model(guidance_inputs=2, steps=5)
    module.net.register_forward_hook(record, with_kwargs=True)
    module.generate(batch, FRAMES, SIZE, SIZE)
    assert len(calls) == 5 and all(b == 3 for b, _ in calls)
    assert all(g.tolist() == [[1.5, 4.0]] * 3 for _, g in calls)  # (s_image, s_text): pass order, not dict order
    calls.clear()
    module.generate(batch, FRAMES, SIZE, SIZE, guidance_scales={"text": 7.0, "image": 2.0})
    assert calls[0][1].tolist() == [[2.0, 7.0]] * 3
    with pytest.raises(ValueError, match="guidance_inputs=2"):
        module.generate(batch, FRAMES, SIZE, SIZE, guidance_scales={"text": 7.0})

    calls.clear()
    teacher = sticker_model(steps=5)  # the three passes stacked on the batch, one call per step, no guidance input
    teacher.net.register_forward_hook(record, with_kwargs=True)
    teacher.generate(batch, FRAMES, SIZE, SIZE)
    assert len(calls) == 5 and all(b == 9 and g is None for b, g in calls)


# -- the distillation target ------------------------------------------------------------------------------------------
class AffineTeacher(nn.Module):
    """u(x, t) = λ·x + (1 + t)·(a·I + b·[text on]): I the concatenated image latent (zero when off); the text is on
    when the prompt has tokens beyond the BOS token (the empty prompt is BOS alone)."""

    lam, a, b = -0.7, 0.9, 0.4

    def forward(self, x, t, context, context_mask=None, fps=None, cond=None, frame_features=None):
        text_on = (context_mask.sum(1) > 1).to(x).view(-1, 1, 1, 1, 1)
        return self.lam * x + (1 + t).view(-1, 1, 1, 1, 1) * (self.a * cond + self.b * text_on)


class AffineStudent(nn.Module):
    """v = c·x + 0.5·t + 0.2·s_1 − 0.1·s_2 + 0.3·I + 0.6·[text on]: it reads every input the distillation gives."""

    c = 0.3

    def forward(self, x, t, context, context_mask=None, fps=None, cond=None, frame_features=None, guidance=None):
        text_on = (context_mask.sum(1) > 1).to(x).view(-1, 1, 1, 1, 1)
        per_sample = (0.5 * t + 0.2 * guidance[:, 0] - 0.1 * guidance[:, 1]).view(-1, 1, 1, 1, 1)
        return self.c * x + per_sample + 0.3 * cond + 0.6 * text_on


def test_distillation_target_by_hand() -> None:
    """Guided: G = s_I·a·I + s_T·b (p0 = 0, p1 = a·I, p2 = a·I + b), so ũ = λ·y + (1 + τ)·G; six Euler sub-steps of
    h = (t_{k+1} − t_k)/6 from x_{t_k} = t_k·x_1 + (1 − (1 − σ_min)·t_k)·x_0, on the shifted(3) 8-step schedule.
    The student's one pass sees x_{t_k}, t_k, the drawn scales and every condition on."""
    module = student(sticker_model())
    module.teacher.net, module.net = AffineTeacher(), AffineStudent()
    batch = {**clips(3), "frames": FRAMES}
    x1 = module.to_latent(batch)
    image = module.encode(batch["video"][:, :, FRAMES // 2:FRAMES // 2 + 1]).expand_as(x1)
    k, noise = torch.tensor([0, 3, 7]), torch.randn(x1.shape, generator=torch.Generator().manual_seed(3))
    scales = torch.tensor([[1.2, 6.0], [2.5, 1.0], [1.0, 3.5]])  # (s_I, s_T)

    sigma = 1 - torch.arange(9, dtype=torch.float64) / 8
    grid = 1 - 3 * sigma / (1 + 2 * sigma)
    x_t, target, v = [], [], []
    for i in range(3):
        t0, t1 = grid[k[i]].item(), grid[k[i] + 1].item()
        x = t0 * x1[i].double() + (1 - (1 - SIGMA_MIN) * t0) * noise[i].double()
        g = scales[i, 0].item() * AffineTeacher.a * image[i].double() + scales[i, 1].item() * AffineTeacher.b
        y, h = x, (t1 - t0) / 6
        for j in range(6):
            y = y + h * (AffineTeacher.lam * y + (1 + t0 + j * h) * g)
        x_t.append(x)
        target.append((y - x) / (t1 - t0))
        v.append(AffineStudent.c * x + 0.5 * t0 + 0.2 * scales[i, 0].item() - 0.1 * scales[i, 1].item()
                 + 0.3 * image[i].double() + 0.6)
    x_t, target, v = torch.stack(x_t).float(), torch.stack(target).float(), torch.stack(v)

    t, t_next = grid[k].float(), grid[k + 1].float()
    assert torch.allclose(module.student_times(), grid.float(), atol=1e-6)
    assert torch.allclose(module.teacher_target(batch, x_t, t, t_next, scales), target, atol=1e-4, rtol=1e-4)

    loss = module.distillation_loss(batch, k=k, noise=noise, scales=scales)
    assert loss.item() == pytest.approx((v - target.double()).pow(2).mean().item(), rel=1e-4)
    # A data-predicting student distilled in its own space: its output x̂ against the data point that the target
    # velocity implies at (x_t, t). From x_t = t·x_1 + (1 − c·t)·x_0 and v = x_1 − c·x_0 (c = 1 − σ_min):
    # x_1 = c·x_t + (1 − c·t)·v.
    data_student = student(sticker_model(), objective={"prediction": "data"}, distillation_space="prediction")
    data_student.teacher.net, data_student.net = AffineTeacher(), AffineStudent()
    c = 1 - SIGMA_MIN
    implied = torch.stack([c * x_t[i].double() + (1 - c * grid[k[i]]) * target[i].double() for i in range(3)])
    loss = data_student.distillation_loss(batch, k=k, noise=noise, scales=scales)
    assert loss.item() == pytest.approx((v - implied).pow(2).mean().item(), rel=1e-4)
    # the same target in velocity space weighs step k by 1 / (1 − c·t_k)²: the last steps dominate
    data_student.distillation_space = "velocity"
    as_velocity = torch.stack([(v[i] - c * x_t[i].double()) / (1 - c * grid[k[i]]) for i in range(3)])
    loss = data_student.distillation_loss(batch, k=k, noise=noise, scales=scales)
    assert loss.item() == pytest.approx((as_velocity - target.double()).pow(2).mean().item(), rel=1e-4)
    with pytest.raises(ValueError, match="distillation_space='data' must be"):
        student(sticker_model(), distillation_space="data")
    # the student's other uses (its flow-matching loss, validation) see the scales 1: the conditional model
    raw = module.condition_inputs(batch, tuple(x1.shape[1:]), train=False)
    assert module.conditions(raw, batch["fps"], {}).guidance.tolist() == [[1.0, 1.0]] * 3


def test_teacher_and_student_must_agree(tmp_path) -> None:
    teacher = sticker_model()
    with pytest.raises(ValueError, match="latent normalisation"):
        student(teacher, latent_std=0.25)
    with pytest.raises(ValueError, match="teacher_steps=20 must be a multiple"):
        student(teacher, teacher_steps=20)
    with pytest.raises(ValueError, match="guidance_ranges"):
        student(teacher, guidance_ranges={"text": [1.0, 8.0]})
    module = student(teacher, teacher_from=str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match="model.teacher_from"):
        module.setup("fit")
    with torch.no_grad():
        module.teacher.latent_mean.fill_(0.1)  # e.g. a teacher checkpoint with its own latent statistics
    with pytest.raises(ValueError, match="other latents"):
        module.distillation_loss(clips(1))


def test_scales_are_drawn_uniformly_in_their_ranges_in_pass_order() -> None:
    module = student(sticker_model(), guidance_ranges={"text": [2.0, 8.0], "image": [1.0, 3.0]})
    scales = module.draw_scales(4000, torch.Generator().manual_seed(0))
    image, text = scales.unbind(1)
    assert 1.0 <= image.min() < 1.01 and 2.99 < image.max() <= 3.0 and image.mean().item() == pytest.approx(2.0, abs=0.05)
    assert 2.0 <= text.min() < 2.02 and 7.98 < text.max() <= 8.0 and text.mean().item() == pytest.approx(5.0, abs=0.1)


def test_fit_loads_the_teachers_ema_and_saves_only_the_student(tmp_path) -> None:
    """teacher_from holds training weights and an EMA: the teacher gets the EMA, stays frozen and in eval mode,
    stays out of the optimizer and of the student's checkpoint; both losses are logged."""
    source = sticker_model()
    perturb(source)
    ema = {name: p.detach() + 0.01 for name, p in source.named_parameters()}
    torch.save({"state_dict": source.state_dict(),
                "callbacks": {"EMA": {"format": EMA_FORMAT, "decay": 0.9, "num_updates": 1, "shadow": ema}}},
               tmp_path / "teacher.ckpt")
    module = student(sticker_model(seed=3), teacher_from=str(tmp_path / "teacher.ckpt"))
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    loader = DataLoader([clips(2)] * 2, batch_size=None, collate_fn=lambda b: b)
    trainer.fit(module, train_dataloaders=loader)

    assert all(torch.equal(p, ema[name]) for name, p in module.teacher.named_parameters())
    assert not module.teacher.training and module.training
    module.train()
    assert not module.teacher.training
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in module.teacher.parameters()}
    metrics = trainer.callback_metrics
    assert metrics["train/loss"].item() == pytest.approx(
        metrics["train/loss_distill"].item() + 0.5 * metrics["train/loss_data"].item(), rel=1e-5)
    assert metrics["train/loss_data"] > 0
    (validated,) = trainer.validate(module, dataloaders=loader, verbose=False)
    assert validated["val/loss_distill"] > 0 and validated["val/loss"] > 0

    trainer.save_checkpoint(tmp_path / "student.ckpt")
    state = torch.load(tmp_path / "student.ckpt", weights_only=True)["state_dict"]
    assert "net.guidance_embedders.0.mlp.2.weight" in state and not any(k.startswith("teacher.") for k in state)
    fresh = student(sticker_model(seed=4))
    fresh.load_state_dict(state)  # strict: the teacher keeps its own weights
    assert all(torch.equal(p, q) for p, q in zip(fresh.net.parameters(), module.net.parameters()))


# -- a short distillation --------------------------------------------------------------------------------------------
def distill(steps: int = 25, lr: float = 5e-3) -> dict[str, float]:
    """A random (perturbed) tiny teacher; a fresh student distilled for `steps` steps on 4 clips (distillation
    only). The distillation loss at fixed draws, and the MSE between the student's 8-step one-pass sample and the
    teacher's 48-step three-pass sample from the same noise, before and after."""
    teacher = sticker_model(steps=48)
    perturb(teacher)
    module = student(teacher, data_weight=0.0)
    batch = clips(4)
    g = torch.Generator().manual_seed(7)
    fixed = dict(k=torch.tensor([0, 2, 5, 7]), noise=torch.randn(4, C, FRAMES, 4, 4, generator=g),
                 scales=module.draw_scales(4, g))
    noise = module.noise((C, FRAMES, 4, 4), seed=11, count=4)
    reference = teacher.generate(batch, FRAMES, SIZE, SIZE, noise=noise, return_latent=True)

    def measure() -> tuple[float, float]:
        with torch.no_grad():
            loss = module.distillation_loss(batch, **fixed).item()
            sample = module.generate(batch, FRAMES, SIZE, SIZE, noise=noise, return_latent=True)
        return loss, (sample - reference).pow(2).mean().item()

    before = measure()
    optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=lr)
    torch.manual_seed(0)
    for _ in range(steps):
        loss = module.distillation_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = measure()
    return {"loss_before": before[0], "loss_after": after[0], "mse_before": before[1], "mse_after": after[1]}


@pytest.fixture(scope="module")
def distilled() -> dict[str, float]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return distill()
    finally:
        torch.set_num_threads(threads)


def test_short_distillation_lowers_the_distillation_loss(distilled) -> None:
    assert distilled["loss_after"] < 0.75 * distilled["loss_before"], distilled


def test_distilled_student_follows_the_teachers_guided_sampler(distilled) -> None:
    """Before: the student's zero output leaves the noise; after: its 8 one-pass steps land near the teacher's 48
    three-pass steps."""
    assert distilled["mse_after"] < 0.75 * distilled["mse_before"], distilled
