"""Losses of the temporal autoencoder: the LDM VAE objective plus Movie Gen's outlier penalty loss (OPL).

All videos are `[B, 3, T, H, W]` in [-1, 1]; 2D terms treat every frame as an image.

    L = w_rec · L_rec + w_perc · L_perc + w_kl · KL + w_opl · L_OPL + [step ≥ start] · λ · w_adv · L_G

- L_rec: mean |x̂ − x| ("l1") or mean (x̂ − x)² ("l2").
- L_perc, a perceptual-style loss with no downloaded weights. Default "structure" (`StructureLoss`): at scales
  s = 0..S−1 (2^s average pooling), the L1 distance of image gradients, Σ_s mean|∇x̂_s − ∇x_s| (∇ = finite
  differences in x and y), plus the SSIM dissimilarity Σ_s mean(1 − SSIM(x̂_s, x_s)), plus for videos the L1
  distance of frame differences mean|∂_t x̂ − ∂_t x|. Why: MS-SSIM and gradient losses are the classic
  weight-free perceptual losses; they punish blur and misplaced edges, which is what LPIPS is mostly used for
  in VAE training, and the temporal term punishes flicker. Alternative "random_features"
  (`RandomFeatureLoss`): distances between channel-normalised features of a frozen, randomly initialised
  (seeded) conv net — random conv features carry much of the structure that trained ones do.
- KL: the posterior's per-element KL to N(0, I) (`DiagonalGaussian.kl`), 0 for a deterministic autoencoder.
- L_OPL (`outlier_penalty_loss`): see there; on the posterior mean.
- L_G = −mean D(x̂) with a PatchGAN discriminator D (hinge loss for D), from `disc_start` on, with the LDM
  adaptive weight λ = ‖∇_W L_nll‖ / (‖∇_W L_G‖ + 10⁻⁴) (clamped to [0, 10⁴]) at the decoder's last layer W,
  where L_nll is the sum of the reconstruction and perceptual terms. D's hinge loss
  L_D = mean relu(1 − D(x)) + mean relu(1 + D(x̂)) is added to the same total: D is frozen while L_G is computed
  and sees x̂ detached in L_D, so each network gets only its own gradient from one backward pass.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from lightning_modules.nn.tae import DiagonalGaussian


def frames(x: torch.Tensor) -> torch.Tensor:
    """`[B, C, T, H, W]` → `[B·T, C, H, W]`."""
    return rearrange(x, "b c t h w -> (b t) c h w")


# -- outlier penalty ---------------------------------------------------------------------------------------------
def outlier_penalty_loss(z: torch.Tensor, r: float = 3.0) -> torch.Tensor:
    """Movie Gen's outlier penalty on a latent `[B, C, T, h, w]`.

    For every sample and latent frame, X_ij ∈ R^C is the latent vector at position (i, j), Mean(X) and Std(X)
    ∈ R^C are taken over the h·w positions (population std), norms are L2 over channels:

        L_OPL(X, r) = 1/(h·w) Σ_ij max(‖X_ij − Mean(X)‖ − r · ‖Std(X)‖, 0)

    averaged over frames and samples. Positions farther than r "standard radii" from the frame's mean latent
    are pulled back; the rest get no gradient.
    """
    x = rearrange(z, "b c t h w -> b t (h w) c")
    mean = x.mean(dim=2, keepdim=True)
    std = x.std(dim=2, correction=0, keepdim=True)
    distance = torch.linalg.vector_norm(x - mean, dim=-1)
    radius = r * torch.linalg.vector_norm(std, dim=-1)
    return F.relu(distance - radius).mean()


@torch.no_grad()
def outlier_stats(z: torch.Tensor, r: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(fraction of positions with ‖X_ij − Mean(X)‖ > r‖Std(X)‖, largest ‖X_ij − Mean(X)‖ / ‖Std(X)‖), per frame
    as in `outlier_penalty_loss`: how many "spots" a latent has and how extreme the worst one is."""
    x = rearrange(z.float(), "b c t h w -> b t (h w) c")
    distance = torch.linalg.vector_norm(x - x.mean(dim=2, keepdim=True), dim=-1)
    scale = torch.linalg.vector_norm(x.std(dim=2, correction=0, keepdim=True), dim=-1).clamp_min(1e-12)
    ratio = distance / scale
    return (ratio > r).float().mean(), ratio.max()


# -- perceptual-style losses -------------------------------------------------------------------------------------
def gaussian_window(size: int, sigma: float) -> torch.Tensor:
    i = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(i**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 7, sigma: float = 1.5, data_range: float = 2.0) -> torch.Tensor:
    """Mean SSIM of images `[N, C, H, W]`: local Gaussian statistics (reflect padding), per channel,

        SSIM = (2 μ_a μ_b + C1)(2 σ_ab + C2) / ((μ_a² + μ_b² + C1)(σ_a² + σ_b² + C2)),
        C1 = (0.01 L)², C2 = (0.03 L)², L = data_range.
    """
    c = a.shape[1]
    g = gaussian_window(window, sigma).to(a)
    kernel = (g[:, None] * g[None, :]).expand(c, 1, window, window)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, [window // 2] * 4, mode="reflect"), kernel, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.mean()


class StructureLoss(nn.Module):
    """Σ_s [mean|∇x̂_s − ∇x_s| + (1 − SSIM(x̂_s, x_s))] + mean|∂_t x̂ − ∂_t x| (the last for T > 1 only).

    Scales stop early when a frame gets smaller than the SSIM window.
    """

    def __init__(self, scales: int = 3, window: int = 7) -> None:
        super().__init__()
        self.scales, self.window = scales, window

    def forward(self, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        loss = x.new_zeros(())
        if x.shape[2] > 1:
            loss = loss + (x_hat.diff(dim=2) - x.diff(dim=2)).abs().mean()
        a, b = frames(x_hat), frames(x)
        for s in range(self.scales):
            if s > 0:
                a, b = F.avg_pool2d(a, 2), F.avg_pool2d(b, 2)
            if min(a.shape[-2:]) <= self.window:
                break
            gradient = (a.diff(dim=-1) - b.diff(dim=-1)).abs().mean() + (a.diff(dim=-2) - b.diff(dim=-2)).abs().mean()
            loss = loss + gradient + (1.0 - ssim(a, b, window=self.window))
        return loss


class RandomFeatureLoss(nn.Module):
    """Σ_l mean|φ_l(x̂) − φ_l(x)| over the channel-normalised (unit L2 norm per position) features φ_l of a
    frozen conv net (3×3 convs, stride 2 after the first layer, leaky ReLU) with weights drawn from `seed`.

    The weights are non-persistent buffers: a function of the seed, not part of checkpoints.
    """

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128), seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        cin = 3
        for i, cout in enumerate(widths):
            weight = torch.randn(cout, cin, 3, 3, generator=generator) * math.sqrt(2.0 / (9 * cin))
            self.register_buffer(f"weight{i}", weight, persistent=False)
            cin = cout
        self.depth = len(widths)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i in range(self.depth):
            x = F.leaky_relu(F.conv2d(x, getattr(self, f"weight{i}"), stride=1 if i == 0 else 2, padding=1), 0.2)
            out.append(x / (torch.linalg.vector_norm(x, dim=1, keepdim=True) + 1e-6))
        return out

    def forward(self, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        fa, fb = self.features(frames(x_hat)), self.features(frames(x))
        return sum((a - b).abs().mean() for a, b in zip(fa, fb))


# -- discriminator ----------------------------------------------------------------------------------------------------
class PatchDiscriminator(nn.Module):
    """PatchGAN on frames: 4×4 convs, stride 2 for `layers` layers (GroupNorm, leaky ReLU), then a 4×4 conv to
    one logit per patch. Input `[B, 3, T, H, W]`, output `[B·T, 1, h, w]`."""

    def __init__(self, channels: int = 64, layers: int = 3, in_channels: int = 3) -> None:
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = channels
        for i in range(1, layers):
            c_next = channels * min(2**i, 8)
            blocks += [nn.Conv2d(c, c_next, 4, 2, 1), nn.GroupNorm(math.gcd(32, c_next), c_next), nn.LeakyReLU(0.2)]
            c = c_next
        blocks.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(frames(x))


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Inside the block `module`'s parameters do not require grad, so no gradient reaches them."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


# -- the objective ----------------------------------------------------------------------------------------------------
class TAELoss(nn.Module):
    """The weighted sum in the module docstring. `opl_weight=0` (or `opl=False`) turns the OPL off.

    Args:
        rec: "l1" or "l2".
        perceptual: "structure", "random_features" or "none".
        disc_weight: 0 disables the discriminator (no parameters are created).
        disc_start: the global step from which D is trained and L_G enters the loss.
        adaptive_disc_weight: scale L_G by the LDM adaptive weight λ (else λ = 1).
    """

    def __init__(
        self,
        rec: str = "l1",
        rec_weight: float = 1.0,
        perceptual: str = "structure",
        perceptual_weight: float = 0.5,
        kl_weight: float = 1e-6,
        opl: bool = True,
        opl_r: float = 3.0,
        opl_weight: float = 1.0,
        disc_weight: float = 0.0,
        disc_start: int = 0,
        disc_channels: int = 64,
        disc_layers: int = 3,
        adaptive_disc_weight: bool = True,
    ) -> None:
        super().__init__()
        if rec not in ("l1", "l2"):
            raise ValueError(f"loss.rec={rec!r}; choose l1 or l2")
        perceptual_losses = {"structure": StructureLoss, "random_features": RandomFeatureLoss, "none": None}
        if perceptual not in perceptual_losses:
            raise ValueError(f"loss.perceptual={perceptual!r}; choose one of {sorted(perceptual_losses)}")
        self.rec, self.rec_weight = rec, rec_weight
        self.perceptual = perceptual_losses[perceptual]() if perceptual_losses[perceptual] else None
        self.perceptual_weight = perceptual_weight
        self.kl_weight = kl_weight
        self.opl, self.opl_r, self.opl_weight = opl and opl_weight > 0, opl_r, opl_weight
        self.discriminator = PatchDiscriminator(disc_channels, disc_layers) if disc_weight > 0 else None
        self.disc_weight, self.disc_start, self.adaptive_disc_weight = disc_weight, disc_start, adaptive_disc_weight

    def disc_active(self, step: int) -> bool:
        return self.discriminator is not None and step >= self.disc_start

    def reconstruction(self, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return F.l1_loss(x_hat, x) if self.rec == "l1" else F.mse_loss(x_hat, x)

    def forward(
        self,
        x: torch.Tensor,
        x_hat: torch.Tensor,
        posterior: DiagonalGaussian,
        step: int = 0,
        last_layer: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The autoencoder's loss and its terms (for logging). With the discriminator active the total also holds
        D's hinge loss on detached reconstructions; D gets no gradient from the autoencoder's terms. Computed in
        float32 with autocast off (SSIM constants and hinge margins are not bf16-safe)."""
        with torch.autocast(x.device.type, enabled=False):
            x, x_hat = x.float(), x_hat.float()
            posterior = DiagonalGaussian(posterior.mean.float(), None if posterior.logvar is None else posterior.logvar.float())
            return self._terms(x, x_hat, posterior, step, last_layer)

    def _terms(
        self, x: torch.Tensor, x_hat: torch.Tensor, posterior: DiagonalGaussian, step: int, last_layer: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        terms: dict[str, torch.Tensor] = {"rec": self.reconstruction(x_hat, x)}
        nll = self.rec_weight * terms["rec"]
        if self.perceptual is not None:
            terms["perceptual"] = self.perceptual(x_hat, x)
            nll = nll + self.perceptual_weight * terms["perceptual"]
        total = nll
        terms["kl"] = posterior.kl()
        total = total + self.kl_weight * terms["kl"]
        if self.opl:
            terms["opl"] = outlier_penalty_loss(posterior.mean, self.opl_r)
            total = total + self.opl_weight * terms["opl"]
        if self.disc_active(step):
            with frozen(self.discriminator):
                terms["g_adv"] = -self.discriminator(x_hat).mean()
            weight = self.adaptive_weight(nll, terms["g_adv"], last_layer) if self.adaptive_disc_weight else x.new_ones(())
            terms["disc_lambda"] = weight
            total = total + self.disc_weight * weight * terms["g_adv"]
            terms["d_hinge"] = self.discriminator_loss(x, x_hat.detach())
            total = total + terms["d_hinge"]
        terms["total"] = total
        return total, terms

    def adaptive_weight(self, nll: torch.Tensor, g_adv: torch.Tensor, last_layer: torch.Tensor | None) -> torch.Tensor:
        """λ = ‖∇_W L_nll‖ / (‖∇_W L_G‖ + 1e-4), clamped to [0, 1e4], no gradient (1 without W or grad)."""
        if last_layer is None or not torch.is_grad_enabled():
            return nll.new_ones(())
        g_nll = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
        g_adv = torch.autograd.grad(g_adv, last_layer, retain_graph=True)[0]
        return (g_nll.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, 1e4).detach()

    def discriminator_loss(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        """Hinge: mean relu(1 − D(x)) + mean relu(1 + D(x̂))."""
        return F.relu(1.0 - self.discriminator(x)).mean() + F.relu(1.0 + self.discriminator(x_hat)).mean()
