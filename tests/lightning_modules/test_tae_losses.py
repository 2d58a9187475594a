"""The TAE's losses: the outlier penalty by hand, the weight-free perceptual losses, the discriminator wiring."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_modules.nn.tae import TAE, DiagonalGaussian
from lightning_modules.tae_losses import (
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
