"""The TAE's losses: the outlier penalty by hand, the weight-free perceptual losses, the discriminator wiring."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_modules.nn.tae import TAE, DiagonalGaussian
from lightning_modules.tae_losses import (
    PatchDiscriminator,
    RandomFeatureLoss,
    StructureLoss,
    TAELoss,
    frames,
    outlier_penalty_loss,
    outlier_stats,
    ssim,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


# -- outlier penalty ----------------------------------------------------------------------------------------------
def test_outlier_penalty_by_hand() -> None:
    """One frame, C = 2, 16 positions: one at (a, 0), fifteen at (0, 0).

    Mean = (a/16, 0); Std = (a·√15/16, 0), so ‖Std‖ = a√15/16. The outlier is 15a/16 from the mean (ratio √15 ≈
    3.87 > r = 3), the others a/16 (ratio 1/√15). L = (15a/16 − 3·a√15/16) / 16.
    """
    a = 8.0
    z = torch.zeros(1, 2, 1, 4, 4)
    z[0, 0, 0, 2, 1] = a
    expected = (15 * a / 16 - 3 * a * math.sqrt(15) / 16) / 16
    assert outlier_penalty_loss(z, r=3.0).item() == pytest.approx(expected, rel=1e-6)
    assert outlier_penalty_loss(z, r=4.0).item() == 0.0  # √15 < 4: no outlier at r = 4
    fraction, largest = outlier_stats(z, r=3.0)
    assert fraction.item() == pytest.approx(1 / 16) and largest.item() == pytest.approx(math.sqrt(15), rel=1e-5)


def test_outlier_penalty_matches_loops_and_averages_frames_and_samples() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 2, 3, 4, generator=g)
    z[1, :, 1, 0, 0] += 6.0  # a spot in sample 1, frame 1
    r = 1.5
    per_frame = []
    for b in range(2):
        for t in range(2):
            vectors = [[z[b, c, t, i, j].item() for c in range(3)] for i in range(3) for j in range(4)]
            n = len(vectors)
            mean = [sum(v[c] for v in vectors) / n for c in range(3)]
            std = [math.sqrt(sum((v[c] - mean[c]) ** 2 for v in vectors) / n) for c in range(3)]
            radius = r * math.sqrt(sum(s * s for s in std))
            dist = [math.sqrt(sum((v[c] - mean[c]) ** 2 for c in range(3))) for v in vectors]
            per_frame.append(sum(max(d - radius, 0.0) for d in dist) / n)
    assert outlier_penalty_loss(z, r=r).item() == pytest.approx(sum(per_frame) / 4, rel=1e-5)
    assert per_frame[3] > 0


def test_outlier_penalty_pulls_the_spot_back() -> None:
    z = torch.zeros(1, 2, 1, 4, 4)
    z[0, :, 0] = torch.randn(2, 4, 4) * 0.1
    z[0, 0, 0, 2, 1] = 8.0
    z.requires_grad_(True)
    outlier_penalty_loss(z).backward()
    assert z.grad[0, 0, 0, 2, 1] > 0  # descending the gradient lowers the spot
    inliers = z.grad.clone()
    inliers[0, 0, 0, 2, 1] = 0
    assert inliers.abs().max() < z.grad[0, 0, 0, 2, 1]


# -- perceptual-style losses ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_cls", [StructureLoss, RandomFeatureLoss])
def test_perceptual_losses_rank_blur_and_noise(loss_cls) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 3, 32, 32, generator=g) * 2 - 1
    x = torch.nn.functional.avg_pool3d(x, (1, 3, 3), 1, (0, 1, 1))  # some structure
    loss = loss_cls()
    assert loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    slight = loss(x + 0.02 * torch.randn(x.shape, generator=g), x)
    strong = loss(torch.nn.functional.avg_pool3d(x, (1, 5, 5), 1, (0, 2, 2)), x)
    assert 0 < slight < strong


def test_ssim_is_one_for_equal_images_and_drops_with_noise() -> None:
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-5)
    assert ssim(x + 0.3 * torch.randn_like(x), x).item() < 0.9


def test_random_features_are_a_function_of_the_seed() -> None:
    a, b, c = RandomFeatureLoss(seed=3), RandomFeatureLoss(seed=3), RandomFeatureLoss(seed=4)
    assert a.state_dict() == {}  # not in checkpoints
    assert torch.equal(a.weight0, b.weight0) and not torch.equal(a.weight0, c.weight0)


# -- the objective ----------------------------------------------------------------------------------------------------
def test_terms_and_switches() -> None:
    x = torch.rand(2, 3, 4, 16, 16) * 2 - 1
    x_hat = x + 0.1
    posterior = DiagonalGaussian(torch.randn(2, 4, 1, 4, 4), torch.zeros(2, 4, 1, 4, 4))
    total, terms = TAELoss(perceptual="none", kl_weight=0.5, opl_weight=2.0)(x, x_hat, posterior)
    expected = terms["rec"] + 0.5 * terms["kl"] + 2.0 * terms["opl"]
    assert terms["rec"].item() == pytest.approx(0.1, rel=1e-4)
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    _, off = TAELoss(opl=False)(x, x_hat, posterior)
    assert "opl" not in off and "perceptual" in off
    with pytest.raises(ValueError, match="loss.perceptual='lpips'"):
        TAELoss(perceptual="lpips")


def test_discriminator_starts_late_and_gradients_do_not_cross() -> None:
    torch.manual_seed(0)
    net = TAE(latent_channels=4, base_channels=8, channel_mults=(1, 2), temporal_down=(True,), num_res_blocks=1, norm_groups=4)
    loss = TAELoss(disc_weight=0.5, disc_start=10, disc_channels=8, disc_layers=2)
    x = torch.rand(2, 3, 4, 16, 16) * 2 - 1
    last = net.decoder.conv_out.spatial.weight

    x_hat, posterior = net(x)
    _, early = loss(x, x_hat, posterior, step=9, last_layer=last)
    assert "g_adv" not in early and "d_hinge" not in early

    x_hat, posterior = net(x)
    total, terms = loss(x, x_hat, posterior, step=10, last_layer=last)
    assert {"g_adv", "d_hinge", "disc_lambda"} <= set(terms) and terms["disc_lambda"] > 0
    # The discriminator's gradient is exactly that of its hinge loss (none from the generator's term) ...
    d_params = list(loss.discriminator.parameters())
    g_total = torch.autograd.grad(total, d_params, retain_graph=True, allow_unused=True)
    g_hinge = torch.autograd.grad(terms["d_hinge"], d_params, retain_graph=True)
    for a, b in zip(g_total, g_hinge):
        torch.testing.assert_close(a, b)
    # ... and the hinge loss sends nothing into the autoencoder.
    g_net = torch.autograd.grad(terms["d_hinge"], list(net.parameters()), retain_graph=True, allow_unused=True)
    assert all(g is None or g.abs().max() == 0 for g in g_net)
    assert all(p.requires_grad for p in d_params)  # unfrozen again


class MeanLogit(torch.nn.Module):
    """A discriminator with a known answer: each frame's logit map is its channel mean."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return frames(x).mean(dim=1, keepdim=True)


def test_adversarial_terms_by_hand() -> None:
    """With D(x) = 0.5 on real frames and D(x̂) = −0.25 on reconstructions: L_G = −mean D(x̂) = +0.25 and the
    hinge mean relu(1 − D(x)) + mean relu(1 + D(x̂)) = 0.5 + 0.75 = 1.25 (swapped real/fake would give 2.75)."""
    loss = TAELoss(perceptual="none", kl_weight=0.0, opl=False, disc_weight=2.0, disc_channels=8, disc_layers=2,
                   adaptive_disc_weight=False)
    loss.discriminator = MeanLogit()
    x, x_hat = torch.full((2, 3, 4, 8, 8), 0.5), torch.full((2, 3, 4, 8, 8), -0.25)
    posterior = DiagonalGaussian(torch.zeros(2, 4, 1, 2, 2), torch.zeros(2, 4, 1, 2, 2))
    total, terms = loss(x, x_hat, posterior, step=0)
    assert terms["g_adv"].item() == pytest.approx(0.25)
    assert terms["d_hinge"].item() == pytest.approx(1.25)
    assert total.item() == pytest.approx(terms["rec"].item() + 2.0 * 0.25 + 1.25)


def test_loss_runs_in_float32_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    net = TAE(latent_channels=4, base_channels=8, channel_mults=(1, 2), temporal_down=(True,), num_res_blocks=1, norm_groups=4)
    loss = TAELoss(disc_weight=0.5, disc_channels=8, disc_layers=2)
    x = torch.rand(2, 3, 4, 16, 16) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_hat, posterior = net(x)
        total, terms = loss(x, x_hat, posterior, step=0, last_layer=net.decoder.conv_out.spatial.weight)
    assert x_hat.dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 and torch.isfinite(t) for t in terms.values())
    with torch.no_grad():
        _, exact = loss(x, x_hat.float(), posterior)
    assert terms["perceptual"].item() == pytest.approx(exact["perceptual"].item(), rel=1e-5)
    total.backward()
    assert net.encoder.conv_in.spatial.weight.grad is not None


def _ssim_by_loops(a: torch.Tensor, b: torch.Tensor, window: int, sigma: float, data_range: float) -> float:
    """SSIM of [1, 1, H, W] images with explicit loops: 2-D Gaussian weights exp(-(dy² + dx²) / 2σ²) normalised,
    reflect padding, local means / variances / covariance, the SSIM formula, then the mean."""
    r = window // 2
    w = torch.tensor([[math.exp(-(dy * dy + dx * dx) / (2 * sigma**2)) for dx in range(-r, r + 1)]
                      for dy in range(-r, r + 1)], dtype=torch.float64)
    w /= w.sum()
    pa = torch.nn.functional.pad(a.double(), [r] * 4, mode="reflect")[0, 0]
    pb = torch.nn.functional.pad(b.double(), [r] * 4, mode="reflect")[0, 0]
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for y in range(a.shape[-2]):
        for x in range(a.shape[-1]):
            pa_, pb_ = pa[y : y + window, x : x + window], pb[y : y + window, x : x + window]
            ma, mb = (w * pa_).sum(), (w * pb_).sum()
            va, vb = (w * pa_ * pa_).sum() - ma**2, (w * pb_ * pb_).sum() - mb**2
            cov = (w * pa_ * pb_).sum() - ma * mb
            values.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(torch.stack(values).mean())


def test_ssim_matches_an_explicit_computation() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(1, 1, 9, 10, generator=gen) * 2 - 1
    b = (a + 0.3 * torch.randn(1, 1, 9, 10, generator=gen)).clamp(-1, 1)
    for window, sigma in [(7, 1.5), (5, 1.0)]:
        assert float(ssim(a, b, window=window, sigma=sigma)) == pytest.approx(
            _ssim_by_loops(a, b, window, sigma, 2.0), rel=1e-4)


def test_structure_loss_by_its_parts() -> None:
    """The temporal term (T > 1) plus, per scale (16x16, then pooled to 8x8), the gradient term and 1 − SSIM;
    the scales stop at the count, or before a frame that is no larger than the window."""
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 2, 16, 16, generator=gen) * 2 - 1
    x_hat = x + 0.2 * torch.randn(x.shape, generator=gen)
    a, b = x_hat.permute(0, 2, 1, 3, 4).reshape(2, 3, 16, 16), x.permute(0, 2, 1, 3, 4).reshape(2, 3, 16, 16)

    def scale_term(p: torch.Tensor, q: torch.Tensor, window: int = 3) -> torch.Tensor:
        grad = (p.diff(dim=-1) - q.diff(dim=-1)).abs().mean() + (p.diff(dim=-2) - q.diff(dim=-2)).abs().mean()
        return grad + 1 - ssim(p, q, window=window)

    temporal = (x_hat.diff(dim=2) - x.diff(dim=2)).abs().mean()
    pooled = torch.nn.functional.avg_pool2d(a, 2), torch.nn.functional.avg_pool2d(b, 2)
    expected = temporal + scale_term(a, b) + scale_term(*pooled)
    assert float(StructureLoss(scales=2, window=3)(x_hat, x)) == pytest.approx(float(expected), rel=1e-5)
    # a frame no larger than the window ends the scales: 16 -> 8 -> 4 with window 4 stops before the 4x4 scale
    expected_w4 = temporal + scale_term(a, b, 4) + scale_term(*pooled, 4)
    assert float(StructureLoss(scales=3, window=4)(x_hat, x)) == pytest.approx(float(expected_w4), rel=1e-5)


def test_outlier_stats_by_hand() -> None:
    """One frame of 4 positions with values (0, 0, 0, 4) in one channel: mean 1, std sqrt(3), distances 1, 1, 1, 3:
    ratios 1/sqrt(3) x 3 and 3/sqrt(3) = sqrt(3). Above r = 1: 1 of 4; at r = sqrt(3) exactly: none (strict)."""
    z = torch.tensor([0.0, 0.0, 0.0, 4.0]).view(1, 1, 1, 2, 2)
    fraction, worst = outlier_stats(z, r=1.0)
    assert float(fraction) == pytest.approx(0.25) and float(worst) == pytest.approx(math.sqrt(3))
    assert float(outlier_stats(z, r=float(worst))[0]) == 0.0
    # statistics per frame: a constant second frame (distances 0) has no outlier, so the fraction halves
    two = torch.cat([z, torch.full_like(z, 1.0)], dim=2)
    assert float(outlier_stats(two, r=1.0)[0]) == pytest.approx(0.125)
    assert PatchDiscriminator().net[0].out_channels == 64


def test_random_features_are_he_initialised() -> None:
    loss = RandomFeatureLoss(widths=(64, 64), seed=0)
    for i, cin in enumerate((3, 64)):
        weight = getattr(loss, f"weight{i}")
        assert weight.shape[1:] == (cin, 3, 3)  # 3x3 convs
        assert float(weight.std()) == pytest.approx(math.sqrt(2.0 / (9 * cin)), rel=0.05)


def test_discriminator_is_the_pix2pix_patchgan_by_default() -> None:
    """64 -> 128 -> 256 channels (4x4, stride 2) and a 4x4 stride-1 conv to one logit: a 64x64 frame gives
    64 -> 32 -> 16 -> 8 -> 7 patches; the parameters counted by hand (GroupNorm: 2 per channel)."""
    loss = TAELoss(disc_weight=0.1)
    d = loss.discriminator
    assert d(torch.zeros(1, 3, 2, 64, 64)).shape == (2, 1, 7, 7)
    conv = lambda cin, cout: cin * cout * 16 + cout  # noqa: E731
    expected = conv(3, 64) + conv(64, 128) + 2 * 128 + conv(128, 256) + 2 * 256 + conv(256, 1)
    assert sum(p.numel() for p in d.parameters()) == expected
    assert TAELoss().kl_weight == 1e-6  # the LDM VAE's KL weight
    deep = TAELoss(disc_weight=0.1, disc_layers=5).discriminator  # widths capped at 8x: 64, 128, 256, 512, 512
    assert [m.out_channels for m in deep.net if isinstance(m, torch.nn.Conv2d)] == [64, 128, 256, 512, 512, 1]
    assert (StructureLoss().scales, StructureLoss().window) == (3, 7)


def test_adaptive_weight_by_hand() -> None:
    """lambda = |grad_W nll| / (|grad_W g_adv| + 1e-4), clamped to [0, 1e4]."""
    loss = TAELoss(disc_weight=0.1)
    w = torch.tensor([3.0, 4.0], requires_grad=True)
    nll = (w * torch.tensor([0.3, 0.4])).sum()  # grad (0.3, 0.4): norm 0.5
    assert float(loss.adaptive_weight(nll, (w * torch.tensor([0.0, 2.0])).sum(), w)) == pytest.approx(0.5 / (2 + 1e-4))
    assert float(loss.adaptive_weight(nll, (w * 0.0).sum(), w)) == pytest.approx(0.5 / 1e-4)  # the guard
    big = (w * torch.tensor([30.0, 40.0])).sum()  # norm 50: 50 / 1e-4 = 5e5 -> clamped
    assert float(loss.adaptive_weight(big, (w * 0.0).sum(), w)) == 1e4
