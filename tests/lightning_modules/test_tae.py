"""The TAE network: compression and the length rule, images as one-frame clips, tiling, inflation."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_modules.nn.tae import TAE, blend_ramp, inflate_image_weights, is_temporal_parameter, tile_spans

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


TINY = dict(latent_channels=4, base_channels=8, channel_mults=(1, 2, 2), num_res_blocks=1, norm_groups=4)


def tiny(**overrides) -> TAE:
    torch.manual_seed(0)
    return TAE(**{**TINY, "temporal_down": (True, True), **overrides}).eval()


def perturb_temporal(model: TAE, scale: float, seed: int = 1) -> TAE:
    """Move the temporal layers away from their identity/zero init, so that time is really mixed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_temporal_parameter(name) and p.ndim > 1:
                p += scale * torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1] * p.shape[2])
    return model


def smooth_latent(frames: int, channels: int = 4, size: int = 8, seed: int = 0) -> torch.Tensor:
    """z_t = (1 − t/(T−1)) z_0 + t/(T−1) z_1: a latent that changes linearly in time."""
    g = torch.Generator().manual_seed(seed)
    z0, z1 = torch.randn(2, 1, channels, 1, size, size, generator=g).unbind(0)
    w = torch.linspace(0, 1, frames).view(1, 1, frames, 1, 1)
    return (1 - w) * z0 + w * z1


# -- compression and the length rule ------------------------------------------------------------------------------
@pytest.mark.parametrize("frames", [1, 2, 3, 4, 5, 8, 9, 16, 17])
def test_shapes_and_length_rule(frames: int) -> None:
    model = tiny()
    assert (model.temporal_factor, model.spatial_factor) == (4, 4)
    x = torch.rand(2, 3, frames, 16, 32) * 2 - 1
    with torch.no_grad():
        posterior = model.encode(x)
        x_hat, _ = model(x, sample=False)
    latent_frames = math.ceil(frames / 4)
    assert posterior.mean.shape == (2, 4, latent_frames, 4, 8) == model.latent_shape(x.shape)
    assert posterior.logvar.shape == posterior.mean.shape
    assert x_hat.shape == x.shape  # the surplus decoded frames are dropped
    z = posterior.mode()
    with torch.no_grad():
        full = model.decode(z)
    assert full.shape[2] == (1 if latent_frames == 1 else 4 * latent_frames)


def test_paper_compression_at_meta_size() -> None:
    with torch.device("meta"):
        model = TAE()  # the paper's sizes: 8x in T, H, W; 16 channels
    assert (model.temporal_factor, model.spatial_factor, model.latent_channels) == (8, 8, 16)
    assert model.latent_shape((1, 3, 256, 768, 768)) == (1, 16, 32, 96, 96)
    assert model.latent_shape((1, 3, 1, 768, 768)) == (1, 16, 1, 96, 96)


def test_non_multiple_length_equals_last_frame_padding() -> None:
    """The rule: a T-frame clip encodes as the clip extended to ft·ceil(T/ft) frames by its last frame."""
    model = perturb_temporal(tiny(), 0.3)
    x = torch.rand(1, 3, 6, 16, 16) * 2 - 1
    padded = torch.cat([x, x[:, :, -1:].expand(-1, -1, 2, -1, -1)], dim=2)
    with torch.no_grad():
        torch.testing.assert_close(model.encode(x).mean, model.encode(padded).mean)


def test_image_is_a_static_clip() -> None:
    """An image encodes exactly like the static clip of ft copies of it, and a one-frame latent decodes to the
    static clip; with temporal layers far from their init."""
    model = perturb_temporal(tiny(), 0.5)
    image = torch.rand(2, 3, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        z_image = model.encode(image).mean
        z_clip = model.encode(image.expand(-1, -1, 4, -1, -1)).mean
        torch.testing.assert_close(z_image, z_clip, atol=1e-5, rtol=1e-4)
        one = model.decode(z_image)
        four = model.decode(z_image, num_frames=4)
        # the same latent frame decoded inside a 2-frame latent clip (no T=1 shortcut) gives 4 equal frames
        long = model.decode(torch.cat([z_image, z_image], dim=2))[:, :, :4]
    assert one.shape[2] == 1 and four.shape[2] == 4
    torch.testing.assert_close(four, one.expand(-1, -1, 4, -1, -1))
    torch.testing.assert_close(long, four, atol=1e-5, rtol=1e-4)


def test_bad_shapes_are_named() -> None:
    model = tiny()
    with pytest.raises(ValueError, match="multiples of the spatial factor 4"):
        model.encode(torch.zeros(1, 3, 4, 18, 16))
    with pytest.raises(ValueError, match=r"\[B, 3, T, H, W\]"):
        model.encode(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="num_frames=9 does not fit 2 latent frames"):
        model.decode(torch.zeros(1, 4, 2, 4, 4), num_frames=9)
    with pytest.raises(ValueError, match="temporal_down has 1 entries"):
        TAE(channel_mults=(1, 2, 2), temporal_down=(True,))


# -- tiling ---------------------------------------------------------------------------------------------------------
def test_tile_spans_and_ramps() -> None:
    assert tile_spans(10, 4, 2) == [(0, 4), (2, 6), (4, 8), (6, 10)]
    assert tile_spans(9, 4, 2) == [(0, 4), (2, 6), (4, 8), (5, 9)]  # the last window is aligned to the end
    assert tile_spans(3, 4, 2) == [(0, 3)]
    rise, fall = blend_ramp(8, 3, first=False, last=True), blend_ramp(8, 3, first=True, last=False)
    torch.testing.assert_close(rise, torch.tensor([0.25, 0.5, 0.75, 1, 1, 1, 1, 1]))
    torch.testing.assert_close(fall, torch.tensor([1, 1, 1, 1, 1, 0.75, 0.5, 0.25]))
    torch.testing.assert_close(fall[-3:] + rise[:3], torch.ones(3))  # neighbours' weights sum to 1 in an overlap
    assert torch.equal(blend_ramp(5, 2, first=True, last=True), torch.ones(5))


@pytest.mark.parametrize("latent_frames", [5, 9, 12])
def test_tiled_decode_is_exact_for_a_per_frame_model(latent_frames: int) -> None:
    """Temporal layers at their init make the decoder per frame: tiling must then change nothing at all."""
    model = tiny()
    z = torch.randn(1, 4, latent_frames, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(model.decode_tiled(z, tile=4, overlap=2), model.decode(z), atol=1e-5, rtol=1e-4)
        x = torch.rand(1, 3, 4 * latent_frames - 1, 16, 16) * 2 - 1
        torch.testing.assert_close(model.encode_tiled(x, tile=2).mean, model.encode(x).mean, atol=1e-5, rtol=1e-4)


def test_tiled_decode_of_a_static_latent_is_exact_with_temporal_mixing() -> None:
    model = perturb_temporal(tiny(), 0.5)
    z = torch.randn(1, 4, 1, 4, 4).expand(-1, -1, 10, -1, -1)
    with torch.no_grad():
        torch.testing.assert_close(model.decode_tiled(z, tile=4, overlap=2), model.decode(z), atol=1e-5, rtol=1e-4)


def test_tiled_decode_close_on_smooth_latents_and_seams_bounded() -> None:
    """A model whose temporal layers mix time (perturbed from init, as after inflation and some training)
    decoding a latent that moves linearly in time: tiles of 4 latent frames overlapping by 2 (the paper's)."""
    model = perturb_temporal(tiny(), 0.1)
    z = smooth_latent(12)
    with torch.no_grad():
        full = model.decode(z)
        blended = model.decode_tiled(z, tile=4, overlap=2)
        wider = model.decode_tiled(z, tile=8, overlap=4)
        hard = model.decode_tiled(z, tile=4, overlap=0)
    scale = full.std()
    error = lambda y: ((y - full).abs().mean() / scale).item()
    assert error(blended) < 0.06
    assert ((blended - full).abs().max() / scale).item() < 1.0
    assert error(wider) < error(blended) < error(hard)  # more context, smaller error; blending beats hard cuts

    # Seams: the frame-to-frame change added by tiling, |Δ_t tiled − Δ_t full| (mean over pixels), is small
    # relative to the clip's own largest frame-to-frame change, and smaller than with hard cuts.
    jumps = lambda y: y.diff(dim=2).abs().mean(dim=(0, 1, 3, 4))
    seam = lambda y: (jumps(y) - jumps(full)).abs().max().item()
    assert seam(blended) < 0.25 * jumps(full).max().item()
    assert seam(blended) < seam(hard)


def test_spatial_tiles_converge_to_untiled() -> None:
    """Spatial tiles are approximate (GroupNorm statistics and spatial attention are per tile): the error must
    shrink as tiles grow and vanish when one tile covers the frame."""
    model = perturb_temporal(tiny(), 0.1)
    g = torch.Generator().manual_seed(0)
    coarse = torch.randn(1, 4, 1, 3, 3, generator=g)
    z = torch.nn.functional.interpolate(coarse, size=(1, 24, 24), mode="trilinear", align_corners=True)
    with torch.no_grad():
        full = model.decode(z)
        errors = [
            ((model.decode_tiled(z, spatial_tile=size, spatial_overlap=size // 2) - full).abs().mean() / full.std()).item()
            for size in (8, 16, 24)
        ]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-5


# -- inflation ------------------------------------------------------------------------------------------------------
def test_inflate_image_weights() -> None:
    torch.manual_seed(0)
    image_model = TAE(**TINY, temporal_down=None, temporal=False).eval()
    assert image_model.temporal_factor == 1
    assert not any(is_temporal_parameter(n) for n, _ in image_model.named_parameters())
    video = tiny()
    left = inflate_image_weights(video, image_model.state_dict())
    assert left and all(is_temporal_parameter(n) for n in left)

    # The inflated model reconstructs a static clip as the image model reconstructs its frame.
    image = torch.rand(2, 3, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        expected = image_model.decode(image_model.encode(image).mean)
        got = video.decode(video.encode(image.expand(-1, -1, 4, -1, -1)).mean, num_frames=4)
    torch.testing.assert_close(got, expected.expand(-1, -1, 4, -1, -1), atol=1e-5, rtol=1e-4)

    # 2D kernels [O, I, k, k] are inflated to [O, I, 1, k, k]; mismatches are named.
    flat = {k: v.squeeze(2) if v.ndim == 5 and v.shape[2] == 1 and v.shape[-1] == 3 else v for k, v in image_model.state_dict().items()}
    inflate_image_weights(tiny(), flat)
    with pytest.raises(ValueError, match="missing"):
        inflate_image_weights(tiny(), {k: v for k, v in image_model.state_dict().items() if "conv_in" not in k})
    with pytest.raises(ValueError, match="shape mismatch"):
        inflate_image_weights(tiny(latent_channels=8), image_model.state_dict())
