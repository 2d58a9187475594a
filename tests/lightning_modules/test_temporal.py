"""Temporal layers and `inflate`: TemporalConv and TemporalAttention start as the identity and otherwise compute
what an explicit loop computes; the inflated UNet is exactly the image UNet at initialisation and mixes frames
once its temporal weights move; freezing leaves only the temporal layers trainable; image checkpoints load into
the inflated model; it builds on the meta device and trains in the generation core."""

from __future__ import annotations

import copy
import math
from functools import partial

import pytest
import torch

from lightning_modules.conditioning import Text
from lightning_modules.generation import GenerationModule
from lightning_modules.nn.codecs import PixelCodec
from lightning_modules.nn.temporal import (
    TemporalAttention,
    TemporalConv,
    frame_positions,
    inflate,
    sites,
    temporal_layers,
    temporal_parameters,
)
from lightning_modules.nn.text import ByteEncoder, TextConditioner
from lightning_modules.nn.unet import UNet
from lightning_modules.parallel import materialise

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def image_unet(**kwargs) -> UNet:
    """A tiny UNet with every weight non-zero (the zero-initialised output layers too), so that every path
    carries signal and the exactness checks are not about zeros."""
    torch.manual_seed(0)
    net = UNet(**(dict(in_channels=4, dim=16, channels=(8, 16), heads=2, groups=4) | kwargs))
    with torch.no_grad():
        for p in net.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.1)
    return net


def perturb(layers: list[torch.nn.Module], std: float = 0.2) -> None:
    with torch.no_grad():
        for layer in layers:
            for p in layer.parameters():
                p.add_(std * torch.randn_like(p))


def inputs(net: UNet, b: int = 2, t: int = 4, size: int = 8):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(b, net.in_channels, t, size, size, generator=g), torch.rand(b, generator=g),
            torch.randn(b, 5, net.dim, generator=g))


# -- the layers on their own ------------------------------------------------------------------------------------
def test_temporal_conv_is_the_identity_then_a_convolution_over_frames() -> None:
    layer = TemporalConv(6)
    x = torch.randn(2, 5, 6, 3, 4)  # [B, T, C, H, W]
    torch.testing.assert_close(layer(x), x, rtol=0, atol=0)
    perturb([layer])
    w, bias = layer.conv.weight, layer.conv.bias  # [C_out, C_in, 3], [C_out]
    padded = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, 0, 1, 1))  # one zero frame each side
    expected = torch.stack([x[:, f] + bias[:, None, None]
                            + sum(torch.einsum("oc,bchw->bohw", w[:, :, k], padded[:, f + k]) for k in range(3))
                            for f in range(5)], dim=1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert layer(x[:, :1]).shape == (2, 1, 6, 3, 4)  # the frame count comes from the input


def test_temporal_attention_is_the_identity_then_attention_over_frames() -> None:
    torch.manual_seed(0)
    layer = TemporalAttention(8, heads=2)
    x = torch.randn(2, 5, 8, 3, 2)
    torch.testing.assert_close(layer(x), x, rtol=0, atol=0)
    perturb([layer])
    out = layer(x)
    attn = layer.attn
    for b, i, j in [(0, 0, 0), (1, 2, 1)]:  # the sequence of frames at one position, by hand
        z = x[b, :, :, i, j]  # [T, C]
        q_in = torch.nn.functional.layer_norm(z, (8,), layer.norm.weight, layer.norm.bias) + frame_positions(5, 8)
        q = attn.to_q(q_in).view(5, 2, 4).transpose(0, 1)
        k = attn.to_k(q_in).view(5, 2, 4).transpose(0, 1)  # heads × frames × head_dim
        v = attn.to_v(q_in).view(5, 2, 4).transpose(0, 1)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(4), dim=-1)
        expected = z + attn.to_out((weights @ v).transpose(0, 1).reshape(5, 8))
        torch.testing.assert_close(out[b, :, :, i, j], expected, rtol=1e-5, atol=1e-5)
    # positions do not mix, frames do
    changed = x.clone()
    changed[0, 0, :, 1, 1] += torch.randn(8)  # not a constant: LayerNorm removes those
    diff = (layer(changed) - out).abs()
    assert diff[0, 1, :, 1, 1].max() > 1e-4
    assert diff[0, :, :, 0, 0].max() == 0 and diff[1].max() == 0


def test_frame_positions_are_sinusoids_of_the_frame_index() -> None:
    pe = frame_positions(4, 6)
    assert pe.shape == (4, 6)
    torch.testing.assert_close(pe[:, 0], torch.cos(torch.arange(4.0)))
    torch.testing.assert_close(pe[:, 3], torch.sin(torch.arange(4.0)))
    assert frame_positions(3, 5)[:, -1].abs().max() == 0  # odd widths: the last channel is padding


# -- inflation ----------------------------------------------------------------------------------------------------
def test_inflation_is_exact_at_initialisation() -> None:
    image = image_unet(fps_embedding=True)
    video = inflate(copy.deepcopy(image))
    kinds = [site.inflate_site for _, site in sites(video)]
    resblocks, transformers = 2 * 1 + 2 + 2 * 2, 1 + 1 + 2  # down (1 per level), mid 2, up (2 per level)
    assert kinds.count("conv") == 2 * resblocks and kinds.count("attention") == transformers
    assert all(isinstance(layer, TemporalConv | TemporalAttention) for layer in temporal_layers(video))
    x, t, ctx = inputs(image)
    out = video(x, t, ctx, fps=torch.full((2,), 8.0))
    torch.testing.assert_close(out, image(x, t, ctx, fps=torch.full((2,), 8.0)), rtol=0, atol=0)
    per_frame = torch.cat([image(x[:, :, f:f + 1], t, ctx, fps=torch.full((2,), 8.0)) for f in range(4)], dim=2)
    torch.testing.assert_close(out, per_frame, rtol=1e-5, atol=1e-6)
    assert out.abs().max() > 1e-2  # not a comparison of zeros


@pytest.mark.parametrize("kind", [TemporalConv, TemporalAttention])
def test_moved_temporal_weights_mix_frames(kind: type) -> None:
    """Once the temporal weights move (here: only one kind of layer), a change to frame 0 changes frame 1's
    output, which the image UNet never does."""
    image = image_unet()
    video = inflate(copy.deepcopy(image))
    perturb([layer for layer in temporal_layers(video) if isinstance(layer, kind)])
    x, t, ctx = inputs(image)
    changed = x.clone()
    changed[:, :, 0] += torch.randn_like(changed[:, :, 0])
    assert (video(changed, t, ctx)[:, :, 1] - video(x, t, ctx)[:, :, 1]).abs().max() > 1e-4
    torch.testing.assert_close(image(changed, t, ctx)[:, :, 1:], image(x, t, ctx)[:, :, 1:], rtol=1e-5, atol=1e-6)


def test_freeze_spatial_trains_only_the_temporal_layers() -> None:
    video = inflate(image_unet(), freeze_spatial=True)
    trainable = {id(p) for p in video.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in temporal_parameters(video)} and trainable
    x, t, ctx = inputs(video)
    video(x, t, ctx).square().mean().backward()
    for name, p in video.named_parameters():
        if id(p) in trainable:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    # the zero-initialised layers get gradients (a TemporalConv's weights, TemporalAttention's output projection)
    assert all(layer.conv.weight.grad.abs().max() > 0 for layer in temporal_layers(video) if isinstance(layer, TemporalConv))
    assert all(layer.attn.to_out.weight.grad.abs().max() > 0
               for layer in temporal_layers(video) if isinstance(layer, TemporalAttention))
    unfrozen = inflate(image_unet(), freeze_spatial=False)
    assert all(p.requires_grad for p in unfrozen.parameters())


def test_image_weights_load_into_the_inflated_model_and_inflating_twice_fails() -> None:
    image = image_unet()
    video = inflate(UNet(in_channels=4, dim=16, channels=(8, 16), heads=2, groups=4))
    missing, unexpected = video.load_state_dict(image.state_dict(), strict=False)
    assert not unexpected and missing and all(".temporal." in name for name in missing)
    x, t, ctx = inputs(image, t=3)
    torch.testing.assert_close(video(x, t, ctx), image(x, t, ctx), rtol=0, atol=0)
    with pytest.raises(ValueError, match="already inflated"):
        inflate(video)
    with pytest.raises(ValueError, match="no temporal sites"):
        inflate(torch.nn.Linear(2, 2))


def test_factories_choose_what_each_kind_of_site_gets() -> None:
    """AVID-style use: something else after the attentions, nothing after the convs."""
    video = inflate(image_unet(), make_conv=None, make_attention=lambda site: TemporalAttention(site.channels, heads=1))
    filled = [(site.inflate_site, site.temporal) for _, site in sites(video)]
    assert all(layer is None for kind, layer in filled if kind == "conv")
    assert all(isinstance(layer, TemporalAttention) and layer.attn.heads == 1
               for kind, layer in filled if kind == "attention")


def test_inflated_unet_builds_on_the_meta_device() -> None:
    """Built on meta, inflated there, then materialised: the UNet's init_weights covers the temporal layers."""
    with torch.device("meta"):
        video = inflate(UNet(in_channels=4, dim=16, channels=(8, 16), heads=2, groups=4))
    assert all(p.is_meta for p in temporal_parameters(video))
    materialise(video, "cpu")
    for layer in temporal_layers(video):
        weight = layer.conv.weight if isinstance(layer, TemporalConv) else layer.attn.to_out.weight
        assert weight.abs().max() == 0  # the identity
    x, t, ctx = inputs(video)
    assert torch.count_nonzero(video(x, t, ctx)) == 0  # and the UNet's own zero start


def test_frozen_inflated_unet_trains_in_the_generation_core() -> None:
    torch.manual_seed(0)
    net = inflate(image_unet(in_channels=12), freeze_spatial=True)  # stands for a trained image model
    text = Text(TextConditioner({"byte": ByteEncoder(dim=16, depth=1, heads=2, max_length=32)}, dim=16), dropout=0.0)
    text.requires_grad_(False)
    model = GenerationModule(net, PixelCodec(2), {"text": text}, optimizer=partial(torch.optim.AdamW, lr=1e-2))
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in temporal_parameters(net)}
    spatial = {name: p.detach().clone() for name, p in net.named_parameters() if not p.requires_grad}
    optimizer = model.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    batch = {"video": torch.rand(2, 3, 4, 8, 8) * 2 - 1, "text": ["a", "b"], "fps": torch.tensor([8.0, 8.0])}
    for _ in range(3):
        optimizer.zero_grad()
        model.loss(batch, train=True).backward()
        optimizer.step()
    assert all(torch.equal(p, spatial[name]) for name, p in net.named_parameters() if not p.requires_grad)
    assert any(p.abs().max() > 0 for layer in temporal_layers(net) if isinstance(layer, TemporalConv)
               for p in layer.parameters())
