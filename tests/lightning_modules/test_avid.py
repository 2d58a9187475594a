"""AVID's image inpainting model (conf/model/avid_inpaint.yaml): the UNet's input is Stable Diffusion inpainting's
layout, [noisy latent, mask, latent of the masked image] on the channels, and the concatenated channels start at
zero weight."""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from einops import rearrange
from torch import nn

from experiments.compose import compose_config


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
