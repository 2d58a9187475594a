"""Conditioners and their use by the generation core: shapes, null values and dropout of each kind; new input
weights that leave a checkpoint's predictions unchanged; multi-condition guidance against its formula; a VP
objective with DDIM wired through the same module."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from lightning_modules.conditioning import (
    Conditions,
    FrameFeatures,
    LowResolutionVideo,
    Mask,
    MaskedVideo,
    ReferenceImage,
    StillImage,
    TaskTokens,
    Text,
    resize_video,
)
from lightning_modules.generation import GenerationModule
from lightning_modules.generative.paths import VPPath
from lightning_modules.nn.codecs import PixelCodec
from lightning_modules.nn.dit import DiT
from lightning_modules.nn.text import ByteEncoder, TextConditioner
from lightning_modules.nn.vision import PatchEncoder

pytestmark = pytest.mark.usefixtures("one_thread")

DIM, C = 32, 48  # model width; latent channels of PixelCodec(4) (4x4 space-to-depth of RGB)


def text() -> Text:
    return Text(TextConditioner({"byte": ByteEncoder(dim=DIM, depth=1, heads=4, max_length=64)}, dim=DIM), dropout=0.0)


def build(extra: dict | None = None, cond_channels: int = 0, **kwargs) -> GenerationModule:
    torch.manual_seed(0)
    net = DiT(in_channels=C, dim=DIM, depth=2, heads=4, ffn_dim=64, max_t=4, max_h=4, max_w=4,
              cond_channels=cond_channels)
    options = dict(latent_std=0.5, sampler=dict(steps=2, guidance={"text": 1.0})) | kwargs
    return GenerationModule(net, PixelCodec(4), {"text": text(), **(extra or {})},
                            optimizer=partial(torch.optim.AdamW, lr=1e-3), **options)


def perturb(module: torch.nn.Module, scale: float = 0.05) -> None:
    """Random non-zero weights everywhere (zero-initialised layers included), so outputs depend on all inputs."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


def clips(b: int = 2, t: int = 4, size: int = 16) -> dict:
    torch.manual_seed(1)
    return {"video": torch.rand(b, 3, t, size, size) * 2 - 1, "text": ["a red circle", "a blue star"][:b],
            "fps": torch.full((b,), 8.0), "frames": t}


def test_text_prompts_null_and_dropout() -> None:
    cond = text()
    batch = clips()
    raw = cond.inputs(batch, None, (C, 4, 4, 4), train=True)
    assert raw == ["FPS-8 a red circle", "FPS-8 a blue star"]
    assert cond.inputs({**batch, "frames": 1}, None, (C, 1, 4, 4), train=True) == ["a red circle", "a blue star"]
    assert cond.drop(raw, torch.tensor([True, False])) == ["FPS-8 a red circle", ""]
    tokens, mask = cond(raw)
    assert tokens.shape[:2] == mask.shape and tokens.shape[-1] == DIM
    empty_tokens, empty_mask = cond([""])
    assert empty_mask.sum() == 1  # the empty prompt is one BOS token: still attendable


def test_concatenated_latents_follow_the_latent_grid() -> None:
    module = build()
    batch = clips()
    shape = (C, 4, 4, 4)
    low_res = LowResolutionVideo(channels=C, scale=2)
    latent = low_res.inputs(batch, module.encode, shape, train=False)
    assert latent.shape == (2, *shape)
    low = low_res.low_resolution(batch["video"])
    assert low.shape == (2, 3, 4, 8, 8)
    # a user's low-resolution video ("source", task=sample) gives the same condition as the one made from "video"
    assert torch.allclose(low_res.inputs({"source": low}, module.encode, shape, False), latent)
    assert low_res.target_size({"source": low}) == (4, 16, 16)
    assert torch.allclose(low_res.preview(batch)["bilinear"], resize_video(low, 16, 16))
    assert torch.equal(low_res.drop(latent, torch.tensor([False, True]))[0], torch.zeros(shape))

    still = StillImage(channels=C).inputs(batch, module.encode, shape, train=False)
    assert torch.equal(still[:, :, 0], still[:, :, 3])  # the first frame, repeated over latent frames
    assert torch.allclose(still[:, :, :1], module.encode(batch["video"][:, :, :1]))

    mask = torch.zeros(2, 1, 4, 16, 16)
    mask[..., :8, :] = 1.0  # the top half is to be filled
    masked = {**batch, "mask": mask}
    on_grid = Mask().inputs(masked, module.encode, shape, train=False)
    assert on_grid.shape == (2, 1, 4, 4, 4) and on_grid[..., :2, :].eq(1).all() and on_grid[..., 2:, :].eq(0).all()
    blanked = MaskedVideo(channels=C).preview(masked)["masked"]
    assert blanked[..., :8, :].eq(0).all() and torch.equal(blanked[..., 8:, :], batch["video"][..., 8:, :])
    # without a mask in the batch, one random box is drawn and shared by Mask and MaskedVideo of the same step
    unmasked = dict(batch)
    Mask().inputs(unmasked, module.encode, shape, train=True)
    drawn = unmasked["mask"]
    assert 0 < drawn.mean() < 1 and torch.equal(drawn[:, :, 0], drawn[:, :, -1])
    MaskedVideo(channels=C).inputs(unmasked, module.encode, shape, train=True)
    assert unmasked["mask"] is drawn


def test_tokens_start_at_zero_and_null_tokens_are_masked() -> None:
    reference = ReferenceImage(PatchEncoder(dim=16, patch=4), dim=DIM)
    raw = reference.inputs(clips(), None, (C, 4, 4, 4), train=False)
    tokens, mask = reference(raw)
    assert tokens.shape == (2, 16, DIM) and mask.all() and tokens.abs().max() == 0  # zero-initialised projection
    _, mask = reference(reference.drop(raw, torch.tensor([True, False])))
    assert mask[0].all() and not mask[1].any()

    tasks = TaskTokens(["add", "remove", "style"], dim=DIM, tokens=2, embed_dim=3)
    ids = tasks.inputs({"task": ["remove", "style"]}, None, (), train=False)
    assert ids.tolist() == [1, 2]
    tokens, _, vector = tasks(ids)
    assert tokens.abs().max() == 0 and vector.abs().max() == 0  # zero-initialised projections
    with torch.no_grad():  # e = one-hot, W_tok = 1, W_vec = 2 (biases 0): tokens = 1, vector = 2
        tasks.embedding.weight.copy_(torch.eye(3))
        tasks.to_tokens.weight.fill_(1.0)
        tasks.to_vector.weight.fill_(2.0)
    tokens, mask, vector = tasks(tasks.drop(ids, torch.tensor([True, False])))
    assert tokens.shape == (2, 2, DIM) and tokens[0].eq(1).all() and mask[0].all() and not mask[1].any()
    assert vector.shape == (2, DIM) and vector[0].eq(2).all() and vector[1].eq(0).all()  # the null task: no vector
    editing = TaskTokens(["t2v", "edit"], dim=DIM, default="t2v", source_task="edit")
    assert editing.names({"text": ["a", "b"]}) == ["t2v", "t2v"]
    assert editing.names({"text": ["a"], "source": torch.zeros(1)}) == ["edit"]
    with pytest.raises(ValueError, match="unknown task.*'paint'"):
        tasks.inputs({"task": ["paint"]}, None, (), train=False)


def test_frame_features_are_resampled_to_latent_frames() -> None:
    frames = FrameFeatures(features=3, dim=DIM)
    features = torch.tensor([[[0.0, 0, 0], [3.0, 3, 3]]])  # 2 feature frames -> 4 latent frames, linearly
    raw = frames.inputs({"features": features}, None, (C, 4, 4, 4), train=False)
    assert torch.allclose(raw[0, :, 0], torch.tensor([0.0, 1.0, 2.0, 3.0]))
    assert frames(raw).abs().max() == 0  # zero-initialised projection
    with pytest.raises(ValueError, match=r"must be \[B, T, 3\]"):
        frames.inputs({"features": torch.zeros(1, 2, 5)}, None, (C, 4, 4, 4), train=False)


def test_new_conditioners_leave_a_checkpoint_unchanged(tmp_path) -> None:
    """A text-only model's weights loaded into a model with a concatenated latent and frame features
    (init_from): the new input weights are zero, so its predictions are the text-only model's."""
    plain = build()
    perturb(plain)
    torch.save({"state_dict": plain.state_dict()}, tmp_path / "t2v.ckpt")
    extra = {"image": StillImage(channels=C), "features": FrameFeatures(features=3, dim=DIM)}
    richer = build(extra, cond_channels=C)
    richer.load_stage_weights(tmp_path / "t2v.ckpt")
    batch = {**clips(), "features": torch.randn(2, 4, 3)}
    x_t, t = torch.randn(2, C, 4, 4, 4), torch.tensor([0.3, 0.7])
    with torch.no_grad():
        want = plain(x_t, t, plain.conditions(plain.condition_inputs(batch, (C, 4, 4, 4), False), batch["fps"], {}))
        got = richer(x_t, t, richer.conditions(richer.condition_inputs(batch, (C, 4, 4, 4), False), batch["fps"], {}))
    assert torch.allclose(got, want, atol=1e-6)
    perturb(richer.conditioners["features"])  # once the new weights move, the condition matters
    with torch.no_grad():
        moved = richer(x_t, t, richer.conditions(richer.condition_inputs(batch, (C, 4, 4, 4), False), batch["fps"], {}))
    assert not torch.allclose(moved, want, atol=1e-4)


def test_multi_condition_guidance_matches_its_formula() -> None:
    """InstructPix2Pix's three passes through the core: one Euler step from t = 0 to 1 on a uniform schedule gives
    x_1 = x_0 + u, u = p(0,0) + s_I·[p(I,0) − p(0,0)] + s_T·[p(I,T) − p(I,0)], each pass computed by hand."""
    module = build({"image": StillImage(channels=C)}, cond_channels=C,
                   sampler=dict(steps=1, schedule="uniform", guidance={"image": 1.5, "text": 4.0}))
    perturb(module)
    module.eval()
    batch = clips()
    x0 = module.noise((C, 4, 4, 4), seed=3, count=2)
    got = module.generate(batch, 4, 16, 16, noise=x0, return_latent=True)
    passes, scales = module.guidance_passes({"image": 1.5, "text": 4.0})
    assert passes == [{"image": False, "text": False}, {"image": True, "text": False}, {"image": True, "text": True}]
    assert scales == [1.5, 4.0]
    raw = module.condition_inputs({**batch, "frames": 4}, (C, 4, 4, 4), train=False)
    with torch.no_grad():
        p = [module(x0, torch.zeros(2), module.conditions(raw, batch["fps"], on)) for on in passes]
    want = x0 + p[0] + 1.5 * (p[1] - p[0]) + 4.0 * (p[2] - p[1])
    assert torch.allclose(got, want, atol=1e-5)
    # all scales 1: one pass with every condition on, which is p(I, T)
    single = module.generate(batch, 4, 16, 16, noise=x0, return_latent=True, guidance_scales={"image": 1, "text": 1})
    assert torch.allclose(single, x0 + p[2], atol=1e-5)


def test_a_vp_objective_with_ddim_runs_through_the_same_module() -> None:
    module = build(objective=dict(path=VPPath(schedule="scaled_linear"), prediction="epsilon"),
                   time_sampler=dict(kind="uniform"), sampler=dict(solver="ddim", schedule="trailing", steps=3,
                                                                     guidance={"text": 2.0}))
    perturb(module)
    loss = module.loss(clips(), train=True)
    loss.backward()
    assert torch.isfinite(loss) and module.net.proj_out.weight.grad is not None
    module.eval()
    video = module.generate(clips(), 4, 16, 16, seed=0)
    assert video.shape == (2, 3, 4, 16, 16) and torch.isfinite(video).all()


def test_wiring_errors_name_the_key() -> None:
    with pytest.raises(ValueError, match="cond_channels=0 must equal the channels of the concatenated"):
        build({"image": StillImage(channels=C)})
    with pytest.raises(ValueError, match=r"sampler.guidance names \['video'\]"):
        build(sampler=dict(guidance={"video": 2.0}))
    with pytest.raises(TypeError, match="model.sampler: .*known keys"):
        build(sampler=dict(guidence={"text": 2.0}))


def test_conditions_concatenate_passes_and_cut_windows() -> None:
    a = Conditions(context=torch.ones(2, 3, DIM), context_mask=torch.ones(2, 3, dtype=torch.bool),
                   concat=torch.zeros(2, 4, 6, 2, 2), fps=torch.zeros(2))
    b = Conditions(context=torch.ones(2, 5, DIM), context_mask=torch.ones(2, 5, dtype=torch.bool),
                   concat=torch.ones(2, 4, 6, 2, 2), fps=torch.ones(2))
    both = Conditions.cat([a, b])
    assert both.context.shape == (4, 5, DIM) and both.context_mask[:2, 3:].eq(False).all()
    assert both.context_mask[2:].all() and both.context[:2, 3:].eq(0).all()
    assert both.window(2, 5).concat.shape == (4, 4, 3, 2, 2)
