"""The text-to-image UNet as a backbone of the generation core: shapes for several sizes and configurations, the
zero start, the text and the concatenated condition channels are used, frames are independent, and a short
training of `GenerationModule` with the UNet as `net` on tiny synthetic colour clips lowers the loss."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import hydra
import pytest
import torch
from torch.utils.data import DataLoader

from experiments.compose import compose_config
from lightning_modules.conditioning import Text
from lightning_modules.generation import GenerationModule
from lightning_modules.nn.codecs import PixelCodec
from lightning_modules.nn.text import ByteEncoder, TextConditioner
from lightning_modules.nn.unet import ResBlock, SpatialTransformer, UNet
from tests.helpers import fixed_loss_before_and_after

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def tiny(**kwargs) -> UNet:
    torch.manual_seed(0)
    options = dict(in_channels=4, dim=16, channels=(8, 16), heads=2, groups=4) | kwargs
    return UNet(**options)


def randomise(net: UNet, std: float = 0.1) -> UNet:
    """Give the zero-initialised layers values so that every path carries signal."""
    with torch.no_grad():
        for p in net.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, std)
    return net


def inputs(net: UNet, b: int = 2, t: int = 3, h: int = 8, w: int = 8, length: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, net.in_channels, t, h, w, generator=g)
    return x, torch.rand(b, generator=g), torch.randn(b, length, net.dim, generator=g)


@pytest.mark.parametrize("options, size", [
    ({}, (2, 3, 8, 8)),
    ({}, (1, 1, 4, 12)),                                                   # an image, non-square
    ({"channels": (8, 16, 16), "attention_levels": (0, 2), "layers_per_level": 2}, (2, 2, 8, 4)),
    ({"transformer_depth": 2, "pooled_text": True, "fps_embedding": True}, (3, 2, 6, 6)),
])
def test_output_has_the_latent_shape(options: dict, size: tuple[int, int, int, int]) -> None:
    net = randomise(tiny(**options))
    b, t, h, w = size
    x, time, ctx = inputs(net, b, t, h, w)
    out = net(x, time, ctx, torch.ones(b, 5, dtype=torch.bool), fps=torch.full((b,), 8.0))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_condition_and_output_channels() -> None:
    """cond is concatenated on the input (its weights start at 0: the model ignores it until trained); out_channels
    sets the prediction's width; wrong shapes are clear errors."""
    net = tiny(cond_channels=3, out_channels=6)
    x, time, ctx = inputs(net)
    cond = torch.randn(2, 3, 3, 8, 8)
    randomise(net)
    net.conv_in.conv.weight.data[:, net.in_channels:] = 0.0
    out = net(x, time, ctx, cond=cond)
    assert out.shape == (2, 6, 3, 8, 8)
    torch.testing.assert_close(out, net(x, time, ctx, cond=torch.zeros_like(cond)), rtol=0, atol=0)
    net.conv_in.conv.weight.data[:, net.in_channels:].normal_(0, 0.1)
    assert (out - net(x, time, ctx, cond=cond)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="cond_channels=3"):
        net(x, time, ctx)
    with pytest.raises(ValueError, match="multiples of 2"):
        net(torch.randn(1, 4, 1, 7, 8), time[:1], ctx[:1], cond=torch.randn(1, 3, 1, 7, 8))
    with pytest.raises(ValueError, match="text context"):
        net(x, time, torch.randn(2, 5, 7), cond=cond)


def test_starts_as_the_zero_prediction_with_every_residual_unit_at_its_skip() -> None:
    net = tiny()
    x, time, ctx = inputs(net)
    assert torch.count_nonzero(net(x, time, ctx)) == 0
    res = net.down[0].res[0]
    assert isinstance(res, ResBlock) and res.skip is None
    h = torch.randn(2, 3, 8, 4, 4)
    torch.testing.assert_close(res(h, torch.randn(2, 1, 16)), h, rtol=0, atol=0)
    attn = next(m for m in net.modules() if isinstance(m, SpatialTransformer))
    h = torch.randn(2, 3, attn.channels, 4, 4)
    torch.testing.assert_close(attn(h, ctx), h, rtol=0, atol=0)


def test_the_text_is_used_and_padding_is_ignored() -> None:
    net = randomise(tiny())
    x, time, ctx = inputs(net)
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    out = net(x, time, ctx, mask)
    other = ctx.clone()
    other[0, 1] += 1.0  # a real token of sample 0
    changed = net(x, time, other, mask)
    assert (changed[0] - out[0]).abs().max() > 1e-3
    torch.testing.assert_close(changed[1], out[1])  # samples do not see each other's text
    padded = ctx.clone()
    padded[0, 3:] = torch.randn(2, net.dim)  # padding of sample 0
    torch.testing.assert_close(net(x, time, padded, mask), out)


def test_pooled_text_reaches_every_resblock() -> None:
    """With pooled_text (and cross-attention only in the middle) the text also steers the time embedding."""
    net = randomise(tiny(pooled_text=True, attention_levels=()))
    x, time, ctx = inputs(net)
    net.text_pool.weight.data.zero_()
    net.text_pool.bias.data.zero_()
    a = net(x, time, ctx)
    net.text_pool.weight.data.normal_(0, 0.5)
    assert (net(x, time, ctx) - a).abs().max() > 1e-3


def test_frames_are_independent() -> None:
    """Permuting the frames permutes the outputs; a frame alone gives the same output as inside the clip."""
    net = randomise(tiny(fps_embedding=True))
    x, time, ctx = inputs(net, t=4)
    out = net(x, time, ctx)
    perm = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(net(x[:, :, perm], time, ctx), out[:, :, perm], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net(x[:, :, 2:3], time, ctx), out[:, :, 2:3], rtol=1e-5, atol=1e-6)
    # frame features condition each frame on its own
    features = torch.zeros(2, 4, net.dim)
    features[:, 1] = torch.randn(2, net.dim)
    with_features = net(x, time, ctx, frame_features=features)
    torch.testing.assert_close(with_features[:, :, [0, 2, 3]], out[:, :, [0, 2, 3]], rtol=1e-5, atol=1e-6)
    assert (with_features[:, :, 1] - out[:, :, 1]).abs().max() > 1e-3


# -- in the generation core ---------------------------------------------------------------------------------------
COLOURS = {"red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0), "blue": (-1.0, -1.0, 1.0),
           "yellow": (1.0, 1.0, -1.0), "purple": (1.0, -1.0, 1.0), "white": (1.0, 1.0, 1.0)}


def colour_clips(count: int, frames: int = 2, size: int = 8, seed: int = 0) -> list[dict]:
    """Clips in the datamodules' schema: a frame of the caption's colour, a little noise on it; the caption names
    the colour, so a model that reads the text can predict the clean clip from any noise level."""
    g = torch.Generator().manual_seed(seed)
    names = list(COLOURS)
    clips = []
    for i in range(count):
        name = names[i % len(names)]
        video = torch.tensor(COLOURS[name]).view(3, 1, 1, 1).expand(3, frames, size, size)
        video = (0.8 * video + 0.1 * torch.randn(3, frames, size, size, generator=g)).clamp(-1, 1)
        clips.append({"video": video, "text": f"A {name} picture.", "fps": torch.tensor(8.0)})
    return clips


def module(lr: float = 3e-3) -> GenerationModule:
    torch.manual_seed(0)
    net = UNet(in_channels=12, dim=32, channels=(16, 32), heads=4, groups=8)
    text = Text(TextConditioner({"byte": ByteEncoder(dim=32, depth=1, heads=4, max_length=64)}, dim=32), dropout=0.1)
    return GenerationModule(net, PixelCodec(2), {"text": text}, optimizer=partial(torch.optim.AdamW, lr=lr),
                            latent_std=0.5, sampler=dict(steps=2, guidance={"text": 2.0}))


def test_short_training_in_the_generation_core_lowers_the_loss() -> None:
    model = module()
    assert model.shard_units()[:len(model.net.blocks)] == model.net.blocks  # FSDP / checkpointing units
    held_out = next(iter(DataLoader(colour_clips(12, seed=1), batch_size=12)))
    before, after = fixed_loss_before_and_after(model, held_out, colour_clips(96))
    assert after < 0.6 * before, (before, after)
    video = model.generate({"text": ["A red square.", "A blue square."], "fps": 8.0}, 2, 8, 8, seed=3)
    assert video.shape == (2, 3, 2, 8, 8) and torch.isfinite(video).all()


def test_unet_tiny_config_builds_a_generation_module(outputs: Path) -> None:
    cfg = compose_config(["model=unet_tiny", "trainer=cpu"], outputs / "job")
    net = hydra.utils.instantiate(cfg.model.net)
    assert isinstance(net, UNet) and net.in_channels == 12 and net.dim == cfg.model.conditioners.text.encoder.dim
    assert sum(p.numel() for p in net.parameters()) < 2_000_000  # trains on a CPU
    x = torch.randn(1, 12, 2, 8, 8)
    assert randomise(net)(x, torch.rand(1), torch.randn(1, 4, net.dim)).shape == x.shape
