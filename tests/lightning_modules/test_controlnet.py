"""AVID's structure guidance: the edge maps against values computed another way, and the ControlNet-style encoder
copy with its residuals in the UNet (exact start, w_s = 0 is off, the hint matters, shapes, gradients, copying)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_modules.nn.controlnet import (
    StructureGuidance,
    canny_edges,
    hysteresis,
    sobel_edges,
)
from lightning_modules.nn.temporal import inflate
from lightning_modules.nn.unet import UNet

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


# -- edges ------------------------------------------------------------------------------------------------------------
def step_video(column: int | None = None, row: int | None = None, size: int = 12, low: float = -1.0,
               high: float = 1.0) -> torch.Tensor:
    """A grey video [1, 3, 2, size, size]: `low` before the step (columns < column, or rows < row), `high` after."""
    video = torch.full((1, 3, 2, size, size), low)
    if column is not None:
        video[..., column:] = high
    if row is not None:
        video[..., row:, :] = high
    return video


def test_sobel_matches_a_direct_numpy_convolution() -> None:
    g = torch.Generator().manual_seed(0)
    video = torch.rand(2, 3, 3, 9, 11, generator=g) * 2 - 1
    edges = sobel_edges(video)
    assert edges.shape == (2, 1, 3, 9, 11)

    gray = np.einsum("bcthw,c->bthw", (video.double().numpy() + 1) / 2, [0.299, 0.587, 0.114])
    kx = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float64)
    ky = kx.T
    expected = np.zeros_like(gray)
    for b in range(gray.shape[0]):
        for t in range(gray.shape[1]):
            padded = np.pad(gray[b, t], 1, mode="edge")
            for r in range(gray.shape[2]):
                for c in range(gray.shape[3]):
                    window = padded[r:r + 3, c:c + 3]
                    gx, gy = (window * kx).sum(), (window * ky).sum()
                    expected[b, t, r, c] = min(1.0, np.hypot(gx, gy) / 4)
    np.testing.assert_allclose(edges[:, 0].numpy(), expected, atol=1e-5)


def test_sobel_of_a_constant_is_zero_and_of_a_step_is_two_columns() -> None:
    assert sobel_edges(torch.full((2, 3, 2, 8, 8), 0.3)).abs().max() == 0
    edges = sobel_edges(step_video(column=5))[0, 0]
    expected = torch.zeros(2, 12, 12)
    expected[..., 4:6] = 1.0  # a full-range step: |G_x| = 4 on both sides, scaled to 1
    torch.testing.assert_close(edges, expected)


def test_canny_finds_one_line_at_a_step() -> None:
    assert canny_edges(torch.full((1, 3, 3, 10, 10), -0.2)).sum() == 0
    for column in (3, 7):
        edges = canny_edges(step_video(column=column))
        assert edges.shape == (1, 1, 2, 12, 12)
        expected = torch.zeros(1, 1, 2, 12, 12)
        expected[..., column - 1] = 1.0  # the last pixel before the step, along the whole height
        torch.testing.assert_close(edges, expected)
    edges = canny_edges(step_video(row=6))  # horizontal step: the row before it
    expected = torch.zeros(1, 1, 2, 12, 12)
    expected[..., 5, :] = 1.0
    torch.testing.assert_close(edges, expected)


def test_canny_thresholds_the_contrast() -> None:
    faint = step_video(column=6, low=0.0, high=0.1)  # a 0.05 step in luminance: below low = 0.1
    assert canny_edges(faint).sum() == 0
    assert canny_edges(faint, low=0.01, high=0.02)[..., 5].min() == 1


def test_canny_follows_a_diagonal_edge() -> None:
    """A diagonal step (luminance 1 below the anti-diagonal): one thin line next to the diagonal, no thick band."""
    r, c = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    video = torch.where(r + c >= 16, 1.0, -1.0).expand(1, 3, 1, 16, 16)
    edges = canny_edges(video)[0, 0, 0]
    inner = edges[3:-3, 3:-3]  # away from the borders
    line = (r + c)[3:-3, 3:-3]
    assert inner[line == 15].min() == 1 and inner[(line - 15).abs() > 1].sum() == 0


def test_hysteresis_keeps_weak_pixels_connected_to_strong_ones() -> None:
    weak = torch.zeros(1, 1, 6, 12, dtype=torch.bool)
    weak[0, 0, 1, 0:10] = True  # a weak chain of 10 pixels with a strong pixel at its start
    weak[0, 0, 4, 2:8] = True   # a weak chain with no strong pixel
    strong = torch.zeros_like(weak)
    strong[0, 0, 1, 0] = True
    edges = hysteresis(strong, weak, iterations=16)
    assert torch.equal(edges[0, 0, 1], weak[0, 0, 1]) and edges[0, 0, 4].sum() == 0
    short = hysteresis(strong, weak, iterations=3)  # each iteration grows one pixel
    assert short[0, 0, 1].sum() == 4


# -- structure guidance -----------------------------------------------------------------------------------------------
def tiny(**kwargs) -> UNet:
    torch.manual_seed(0)
    options = dict(in_channels=4, dim=16, channels=(8, 16), heads=2, groups=4) | kwargs
    return UNet(**options)


@torch.no_grad()
def randomise(module: torch.nn.Module, seed: int, std: float = 0.1) -> torch.nn.Module:
    """Move every parameter (the zero-initialised ones included), so every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(torch.randn(p.shape, generator=g) * std)
    return module


def inputs(net: UNet, b: int = 2, t: int = 1, h: int = 8, w: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = dict(x=torch.randn(b, net.in_channels, t, h, w, generator=g), t=torch.rand(b, generator=g),
               context=torch.randn(b, 5, net.dim, generator=g))
    if net.cond_channels:
        out["cond"] = torch.randn(b, net.cond_channels, t, h, w, generator=g)
    return out


def pixel_hint(b: int, t: int, h: int, w: int, seed: int, factor: int = 4) -> torch.Tensor:
    """Canny edges of a random pixel video `factor` times larger than the latent grid."""
    g = torch.Generator().manual_seed(seed)
    video = torch.rand(b, 3, t, h * factor, w * factor, generator=g) * 2 - 1
    return canny_edges(video)


def guided_pair(**options) -> tuple[UNet, StructureGuidance]:
    unet = randomise(tiny(**options), seed=1)
    return unet, StructureGuidance.from_unet(unet, hint_channels=1)


@pytest.mark.parametrize("video", [False, True])
def test_guided_unet_starts_exactly_as_the_plain_unet(video: bool) -> None:
    unet = tiny(cond_channels=5)
    if video:
        inflate(unet)
    randomise(unet, seed=1)
    guide = StructureGuidance.from_unet(unet)
    kw = inputs(unet, t=3 if video else 1)
    hint = pixel_hint(2, kw["x"].shape[2], 8, 8, seed=2)
    residuals, middle = guide(hint=hint, **kw)
    assert all(r.abs().max() == 0 for r in residuals) and middle.abs().max() == 0
    plain = unet(**kw)
    assert plain.abs().max() > 1e-3  # the randomised UNet predicts something
    torch.testing.assert_close(unet(**kw, structure=(residuals, middle)), plain, rtol=0, atol=0)


def test_weight_zero_is_off_and_nonzero_weights_use_the_hint() -> None:
    unet, guide = guided_pair()
    randomise(guide, seed=3, std=0.2)
    kw = inputs(unet)
    hint_a, hint_b = pixel_hint(2, 1, 8, 8, seed=4), pixel_hint(2, 1, 8, 8, seed=5)
    plain = unet(**kw)
    res_a, res_b = guide(hint=hint_a, **kw), guide(hint=hint_b, **kw)
    torch.testing.assert_close(unet(**kw, structure=res_a, structure_weight=0.0), plain, rtol=0, atol=0)
    out_a, out_b = unet(**kw, structure=res_a), unet(**kw, structure=res_b)
    assert (out_a - plain).abs().max() > 1e-3
    assert (out_a - out_b).abs().max() > 1e-3
    # w_s scales the residuals: w_s = 0.5 is the residuals halved at w_s = 1
    half = ([0.5 * r for r in res_a[0]], 0.5 * res_a[1])
    torch.testing.assert_close(unet(**kw, structure=res_a, structure_weight=0.5), unet(**kw, structure=half))
    # one w_s per sample (a batch mixing retexturing, w_s = 1, and object swap, w_s = 0)
    mixed = unet(**kw, structure=res_a, structure_weight=torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(mixed[0], out_a[0])
    torch.testing.assert_close(mixed[1], plain[1], rtol=0, atol=0)


@pytest.mark.parametrize("frames, inflated", [(1, False), (3, False), (3, True)])
def test_residuals_match_the_skip_features(frames: int, inflated: bool) -> None:
    unet = tiny()
    if inflated:
        inflate(unet)
    guide = StructureGuidance.from_unet(randomise(unet, seed=1))
    randomise(guide, seed=3)
    kw = inputs(unet, b=2, t=frames, h=8, w=12)
    residuals, middle = guide(hint=pixel_hint(2, frames, 8, 12, seed=4), **kw)
    # channels (8, 16), one layer per level: conv_in, level 0's ResBlock, its downsample, level 1's ResBlock
    expected = [(2, frames, 8, 8, 12), (2, frames, 8, 8, 12), (2, frames, 8, 4, 6), (2, frames, 16, 4, 6)]
    assert [tuple(r.shape) for r in residuals] == expected and unet.skip_channels == (8, 8, 8, 16)
    assert middle.shape == (2, frames, 16, 4, 6)
    out = unet(**kw, structure=(residuals, middle))
    assert out.shape == kw["x"].shape and (out - unet(**kw)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="must match the skip"):
        unet(**kw, structure=(residuals[:-1], middle))
    with pytest.raises(ValueError, match="middle structure residual"):
        unet(**kw, structure=(residuals, middle[:, :, :8]))


def test_hint_at_the_latent_grid_or_the_pixels() -> None:
    """A hint given at 4x the latent size and its max-pool onto the latent grid give the same residuals."""
    unet, guide = guided_pair()
    randomise(guide, seed=3)
    kw = inputs(unet, t=2)
    pixels = pixel_hint(2, 2, 8, 8, seed=4)
    latent = torch.nn.functional.max_pool3d(pixels, (1, 4, 4))
    for a, b in zip(guide(hint=pixels, **kw)[0], guide(hint=latent, **kw)[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="hint"):
        guide(hint=torch.zeros(2, 3, 2, 8, 8), **kw)


def test_gradients_reach_the_guidance_and_not_the_frozen_unet() -> None:
    unet, guide = guided_pair()
    unet.requires_grad_(False)
    kw = inputs(unet)
    hint = pixel_hint(2, 1, 8, 8, seed=4)

    # at the start only the zero convs get gradients (everything before them is behind a zero): training starts
    unet(**kw, structure=guide(hint=hint, **kw)).square().mean().backward()
    assert all(p.grad is None for p in unet.parameters())
    zero_convs = [*guide.zero, guide.zero_mid]
    assert all(c.conv.weight.grad.abs().sum() > 0 for c in zero_convs)
    assert guide.down[0].res[0].conv1.conv.weight.grad.abs().sum() == 0

    # once they moved, every parameter of the copy learns
    guide.zero_grad(set_to_none=True)
    randomise(guide, seed=3)
    unet(**kw, structure=guide(hint=hint, **kw)).square().mean().backward()
    assert all(p.grad is None for p in unet.parameters())
    missing = [n for n, p in guide.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing


def test_from_unet_copies_the_encoder_weights() -> None:
    unet = inflate(randomise(tiny(fps_embedding=True, cond_channels=2), seed=1), freeze_spatial=True)
    guide = StructureGuidance.from_unet(unet)
    copied = [n for n, _ in guide.named_parameters() if not n.startswith(("hint.", "zero"))]
    source = dict(unet.named_parameters())
    assert copied and all(n.startswith(("conv_in.", "time.", "fps.", "down.", "mid.")) for n in copied)
    assert any(".temporal." in n for n in copied)  # an inflated UNet's temporal layers come along
    for name in copied:
        p = guide.get_parameter(name)
        assert torch.equal(p, source[name]) and p.data_ptr() != source[name].data_ptr(), name
        assert p.requires_grad  # the copy trains though the UNet's spatial weights are frozen
    # the copy is independent; copy_from brings the UNet's (e.g. newly loaded) weights back
    with torch.no_grad():
        unet.down[0].res[0].conv1.conv.weight.add_(1.0)
    assert not torch.equal(guide.down[0].res[0].conv1.conv.weight, unet.down[0].res[0].conv1.conv.weight)
    guide.copy_from(unet)
    assert torch.equal(guide.down[0].res[0].conv1.conv.weight, unet.down[0].res[0].conv1.conv.weight)
