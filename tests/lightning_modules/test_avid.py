"""AVID's image inpainting model (conf/model/avid_inpaint.yaml): the UNet's input is Stable Diffusion inpainting's
layout, [noisy latent, mask, latent of the masked image] on the channels, and the concatenated channels start at
zero weight."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import hydra
import pytest
import torch
from einops import rearrange
from torch import nn
from torch.utils.data import DataLoader

from experiments.compose import compose_config
from lightning_modules.conditioning.masks import MaskGenerator
from tests.helpers import fixed_loss_before_and_after
from tests.lightning_modules.test_unet import colour_clips


def test_the_unet_input_is_noisy_latent_then_mask_then_masked_latent(outputs: Path) -> None:
    cfg = compose_config(["experiment=avid_image"], outputs / "job")
    module = hydra.utils.instantiate(cfg.model, _convert_="object")
    c = module.net.in_channels
    weight = module.net.conv_in.conv.weight
    assert weight.shape[1] == c + 1 + c, "latent, mask, masked latent (4 + 1 + 4 = 9 with SD's VAE)"
    assert weight[:, c:].abs().max() == 0, "the concatenated channels start at zero weight"

    torch.manual_seed(0)
    video = torch.rand(2, 3, 1, 16, 16) * 2 - 1
    mask = torch.zeros(2, 1, 1, 16, 16)
    mask[0, ..., 4:12, 2:10] = 1.0
    mask[1, ..., :, :5] = 1.0  # uncropping the left border
    batch = {"video": video, "text": ["A red circle.", "A blue square."], "fps": torch.zeros(2), "mask": mask}
    x1 = module.to_latent(batch)
    raw = module.condition_inputs({**batch, "frames": 1}, tuple(x1.shape[1:]), train=False)
    conditions = module.conditions(raw, batch["fps"], {})
    seen = []
    module.net.conv_in.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x_t = torch.randn_like(x1)
    module(x_t, torch.full((2,), 0.3), conditions)
    channels = rearrange(seen[0], "b t c h w -> b c t h w")
    torch.testing.assert_close(channels[:, :c], x_t)
    on_grid = nn.functional.adaptive_avg_pool3d(mask, tuple(x1.shape[2:]))
    torch.testing.assert_close(channels[:, c:c + 1], on_grid)
    torch.testing.assert_close(channels[:, c + 1:], module.encode(video * (1 - mask)))
    assert channels[0, c].amax() == 1 and channels[1, c, 0, :, -1].eq(0).all()


def chained(previous: str, stage: str, outputs: Path, tmp_path: Path) -> tuple:
    """(previous stage's module with weights moved off their zero initialisations, the next stage's module
    initialised from its checkpoint as `model.init_from` does)."""
    torch.manual_seed(0)
    before = hydra.utils.instantiate(compose_config([f"experiment={previous}"], outputs / previous).model,
                                     _convert_="object")
    with torch.no_grad():  # away from the zero initialisations, so that the comparisons mean something
        for p in before.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save({"state_dict": before.state_dict()}, tmp_path / f"{previous}.ckpt")
    after = hydra.utils.instantiate(compose_config([f"experiment={stage}"], outputs / stage).model, _convert_="object")
    after.load_stage_weights(tmp_path / f"{previous}.ckpt")
    return before, after


def test_motion_modules_start_as_the_image_model_on_every_frame_and_alone_train(outputs: Path, tmp_path: Path) -> None:
    """Stage 1 (experiment=avid_motion) from the image model's checkpoint: a temporal transformer after every
    spatial layer, each the identity at first, so every frame gets the image model's prediction; only they train."""
    image, video = chained("avid_image", "avid_motion", outputs, tmp_path)

    temporal = [n for n, _ in video.net.named_modules() if n.endswith(".temporal")]
    sites = [n for n, m in video.net.named_modules() if getattr(m, "inflate_site", None)]
    assert len(temporal) == len(sites) and all(
        type(m.temporal).__name__ == "TemporalAttention" for n, m in video.net.named_modules()
        if getattr(m, "inflate_site", None)), "a temporal transformer after every spatial layer"
    trainable = [n for n, p in video.net.named_parameters() if p.requires_grad]
    assert trainable and all(".temporal." in n for n in trainable), "the inpainting UNet is frozen"

    clip = torch.rand(2, 3, 4, 16, 16) * 2 - 1
    batch = {"video": clip, "text": ["A red circle.", "A blue square."], "fps": torch.full((2,), 8.0), "frames": 4}
    x1 = video.to_latent(batch)
    raw = video.condition_inputs(batch, tuple(x1.shape[1:]), train=True)  # draws a (possibly moving) mask
    conditions = video.conditions(raw, batch["fps"], {})
    x_t, t = torch.randn_like(x1), torch.full((2,), 0.4)
    out = video(x_t, t, conditions)
    for f in range(x1.shape[2]):
        frame = image.net(x_t[:, :, f:f + 1], t, **conditions.window(f, f + 1).backbone_kwargs())
        torch.testing.assert_close(out[:, :, f:f + 1], frame, rtol=1e-4, atol=1e-5)


def test_structure_guidance_from_stage_one_starts_as_stage_one_and_w_s_zero_is_no_guidance(
        outputs: Path, tmp_path: Path) -> None:
    """Stage 2 (experiment=avid_structure) from stage 1's checkpoint: its guidance is a copy of the loaded encoder
    with zero outputs (stage 1's prediction, with or without edges); once trained (here: perturbed), edges change
    the prediction at w_s = 1, and w_s = 0 is exactly no guidance. Only the guidance trains."""
    motion, guided = chained("avid_motion", "avid_structure", outputs, tmp_path)
    assert torch.equal(guided.net.guide.conv_in.conv.weight, motion.net.conv_in.conv.weight), "copied after loading"
    trainable = [n for n, p in guided.net.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("guide.") for n in trainable)

    clip = torch.rand(2, 3, 4, 16, 16) * 2 - 1
    clip[..., 8:] = -1.0  # a sharp vertical edge: the map is not empty
    batch = {"video": clip, "text": ["A red circle.", "A blue square."], "fps": torch.full((2,), 8.0), "frames": 4,
             "mask": torch.zeros(2, 1, 4, 16, 16)}
    batch["mask"][..., 4:12, 4:12] = 1.0
    x1 = guided.to_latent(batch)
    raw = guided.condition_inputs(batch, tuple(x1.shape[1:]), train=False)
    assert raw["edges"].shape == (2, 1, *x1.shape[2:]) and raw["edges"].amax() > 0.5
    conditions = guided.conditions(raw, batch["fps"], {})
    assert conditions.structure is not None
    x_t, t = torch.randn_like(x1), torch.full((2,), 0.4)
    plain = motion(x_t, t, replace(conditions, structure=None))  # stage 1 has no use for the map
    torch.testing.assert_close(guided(x_t, t, conditions), plain, rtol=1e-5, atol=1e-6)

    with torch.no_grad():  # a trained guidance
        for p in guided.net.guide.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert (guided(x_t, t, conditions) - plain).abs().max() > 1e-3
    guided.net.structure_weight = 0.0
    torch.testing.assert_close(guided(x_t, t, conditions), plain, rtol=1e-5, atol=1e-6)


def test_short_training_of_the_inpainting_model_lowers_the_loss(outputs: Path) -> None:
    """avid_image's model, 40 steps on clips of one colour each with drawn masks: the loss on held-out clips with
    fixed masks, times and noise falls (the masked video and the caption both tell the colour to fill)."""
    torch.manual_seed(0)
    model = hydra.utils.instantiate(compose_config(["experiment=avid_image"], outputs / "job").model,
                                    _convert_="object")
    held_out = next(iter(DataLoader(colour_clips(12, seed=1), batch_size=12)))
    held_out["mask"] = MaskGenerator()(12, 2, 8, 8, generator=torch.Generator().manual_seed(2))
    before, after = fixed_loss_before_and_after(model, held_out, colour_clips(96))
    assert after < 0.7 * before, (before, after)


def still_textures(count: int, frames: int = 4, size: int = 16, seed: int = 0) -> list[dict]:
    """Clips of a still, smooth random texture (no caption tells it): under a moving mask, what one frame hides
    another shows, which only attention across frames can read."""
    g = torch.Generator().manual_seed(seed)
    clips = []
    for _ in range(count):
        coarse = torch.rand(3, 1, 4, 4, generator=g) * 2 - 1
        image = nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        clips.append({"video": image[:, None].expand(3, frames, size, size).clone(), "text": "A picture.",
                      "fps": torch.tensor(8.0)})
    return clips


@pytest.mark.slow
def test_short_training_of_the_motion_modules_lowers_the_loss(outputs: Path, tmp_path: Path) -> None:
    """avid_motion's model from an image model's checkpoint (motion modules only train; from scratch the frozen
    UNet's zero output layer would pass them no gradient), 40 steps on still textures with drawn masks: the loss
    on held-out clips with fixed moving masks, times and noise falls."""
    _, model = chained("avid_image", "avid_motion", outputs, tmp_path)
    model.init_from = None  # loaded already
    held_out = next(iter(DataLoader(still_textures(8, seed=1), batch_size=8)))
    masks = MaskGenerator(weights={"box": 1.0}, moving=1.0)
    held_out["mask"] = masks(8, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    before, after = fixed_loss_before_and_after(model, held_out, still_textures(96))
    assert after < 0.9 * before, (before, after)
