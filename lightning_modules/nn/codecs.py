"""Codecs between pixel videos and the latent space a generator is trained in (one interface, three kinds).

Interface: `encode(video [B, 3, T, H, W] in [-1, 1]) -> latent [B, C, T', H', W']`, `decode(latent, num_frames)`,
`latent_shape(T, H, W) -> (C, T', H', W')`, `latent_channels`; no trainable parameters (a fitted codec has `fit`).

- `PixelCodec`: parameter-free and exactly invertible space-to-depth, a "latent" that is the pixels folded into
  channels: with spatial factor s and temporal factor f,

      z[b, (c f s s), t, h, w] = x[b, c, t·f + i, h·s + j, w·s + k]

  It needs no trained autoencoder, so the CPU quickstart works on a fresh machine; the DiT then sees
  (f·T_patch) × (s·2)² pixel patches. Images (T = 1) need f = 1.
- `PCACodec`: a linear codec fitted once on the training clips (an SVD, about a second): each patch of f frames
  × s × s pixels is kept as its coordinates on the patches' top K principal components. A temporal factor
  f > 1 makes every latent position a short moving pattern the data contains; K < 3·f·s² drops the rest.
- `TAECodec`: the Movie Gen temporal autoencoder (`nn.tae.TAE`), frozen, loaded from a checkpoint of
  `task=fit` with `experiment=tae_tiny` (its "net." weights) or a plain state dict; encodes to the posterior
  mean. Latents cached with `task=encode` come from the same TAE and skip `encode`. The TAE is deliberately not
  a registered submodule: its weights stay out of the generator's checkpoints, optimizer and FSDP sharding
  (it is reloaded from its own checkpoint, and moved to the input's device when used).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from tqdm.auto import tqdm

from lightning_modules.nn.tae import TAE


class PixelCodec(nn.Module):
    """Space-to-depth by `spatial` in H, W and `temporal` in T (see the module docstring)."""

    def __init__(self, spatial: int = 4, temporal: int = 1, channels: int = 3) -> None:
        super().__init__()
        if spatial < 1 or temporal < 1:
            raise ValueError(f"PixelCodec factors must be >= 1, got spatial={spatial}, temporal={temporal}")
        self.spatial, self.temporal, self.channels = spatial, temporal, channels
        self.latent_channels = channels * temporal * spatial * spatial
        self.spatial_factor, self.temporal_factor = spatial, temporal

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        s, f = self.spatial, self.temporal
        if frames % f or height % s or width % s:
            raise ValueError(f"PixelCodec(spatial={s}, temporal={f}): T, H, W = {frames}, {height}, {width} must be "
                             f"multiples of ({f}, {s}, {s})")
        return self.latent_channels, frames // f, height // s, width // s

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        self.latent_shape(*video.shape[2:])
        return rearrange(video, "b c (t f) (h s) (w r) -> b (c f s r) t h w", f=self.temporal, s=self.spatial, r=self.spatial)

    def decode(self, latent: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        video = rearrange(latent, "b (c f s r) t h w -> b c (t f) (h s) (w r)", c=self.channels, f=self.temporal,
                          s=self.spatial, r=self.spatial)
        return video if num_frames is None else video[:, :, :num_frames]


class PCACodec(nn.Module):
    """Principal components of pixel patches (see the module docstring). With p a patch of f frames × s × s
    pixels × 3 channels (D = 3·f·s² values: a `PixelCodec` latent position's channels), μ the mean patch and B [K, D]
    the top K principal directions of the fitted patches, c = B·(p − μ) a patch's coordinates and v_k = var(c_k):

        z_k = c_k / σ_k,    p̂ = Bᵀ·(σ ⊙ z) + μ,    σ_k = a · v_k^(w/2),   a such that mean_k var(z_k) = 1

    `whiten` w in [0, 1] sets how far the components' sizes are evened out. At w = 0 (one scale for all) a
    patch's mean colour (the first components) stays as visible through the flow's noise as it is in pixels,
    which is what lets the text be learnt at a training shift > 1 (w = 1, whitening, hid it: colour and
    background were lost). But a component of std s is drowned by the noise until flow time t ≈ 1 / (1 + s):
    at w = 0 the outline inside a patch (components 10-48, s ≈ 0.1-0.4 on the quickstart's clips) only
    appears at t ≈ 0.7-0.9, where a shifted time sampler hardly ever trains. w = 0.5 brings those to t ≈ 0.6 and
    keeps the colour ahead (t ≈ 0.2). The basis, the mean and σ are buffers, so checkpoints carry them; `fit`
    computes them (`GenerationModule.setup` fits an unfitted codec on the datamodule's training clips before
    training).

    `refine` R > 0 adds a learned correction to the linear decode, fitted after the basis on the same clips:

        p̂ = Bᵀ·(σ ⊙ z) + μ + g(z),    g = conv₁ₓ₁ ∘ GELU ∘ conv₃ₓ₃ ∘ GELU ∘ conv₃ₓ₃   (width R, over one latent
                                                                                  frame's grid of positions)

    With K well below D, the linear decode leaves ghosts where an object's edge crosses a patch during the clip
    (a faint negative of the object beside it, off the clip's colours); g sees the neighbouring patches as well
    and redraws the edge. It is fitted by L1 on the pixels from the clips' latents plus Gaussian noise of std
    `refine_noise` (so that a generator's slightly-off latents decode clean too), `refine_steps` AdamW steps of
    32 clips, under a forked RNG seeded 0: every rank fits the same g, and the global RNG stream is untouched.
    Its weights are buffers too, so the codec still has no parameters for an optimizer, EMA or sharding."""

    def __init__(self, components: int = 48, spatial: int = 4, temporal: int = 4, channels: int = 3,
                 fit_clips: int = 256, whiten: float = 0.0, refine: int = 0, refine_steps: int = 2000,
                 refine_noise: float = 0.2) -> None:
        super().__init__()
        if not 0.0 <= whiten <= 1.0:
            raise ValueError(f"PCACodec: whiten={whiten} must be in [0, 1]")
        if refine < 0 or refine_steps < 0 or refine_noise < 0:
            raise ValueError(f"PCACodec: refine={refine}, refine_steps={refine_steps} and refine_noise={refine_noise} "
                             f"must be >= 0")
        self.fit_clips, self.whiten = fit_clips, whiten
        self.refine_steps, self.refine_noise = refine_steps, refine_noise
        self.pixels = PixelCodec(spatial, temporal, channels)  # a patch = a pixel latent position's channels
        self.patch_values = self.pixels.latent_channels
        if not 0 < components <= self.patch_values:
            raise ValueError(f"PCACodec: components={components} must be in [1, {self.patch_values}] "
                             f"(3 x temporal x spatial² values a patch)")
        self.latent_channels = components
        self.spatial_factor, self.temporal_factor = spatial, temporal
        self.register_buffer("mean", torch.zeros(self.patch_values))
        self.register_buffer("basis", torch.zeros(components, self.patch_values))
        self.register_buffer("scale", torch.ones(components))  # σ_k
        self.refiner_shapes = {} if refine == 0 else {  # g's weights and biases (buffers: see the docstring)
            "refine_w1": (refine, components, 3, 3), "refine_b1": (refine,),
            "refine_w2": (refine, refine, 3, 3), "refine_b2": (refine,),
            "refine_w3": (self.patch_values, refine, 1, 1), "refine_b3": (self.patch_values,)}
        for name, shape in self.refiner_shapes.items():
            self.register_buffer(name, torch.zeros(shape))

    @property
    def fitted(self) -> bool:
        """A fitted basis is orthonormal, so never all zero."""
        return bool(self.basis.any())

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """T' = ceil(T / f): a clip whose length is not a multiple of f (an image: T = 1) is padded by repeating
        its last frame, as a still object would be (decode cuts the padding off with num_frames)."""
        f = self.temporal_factor
        _, t, h, w = self.pixels.latent_shape(-(-frames // f) * f, height, width)
        return self.latent_channels, t, h, w

    def _patches(self, video: torch.Tensor) -> torch.Tensor:
        """[B, 3, T, H, W] → [B, T', H', W', D] (`PixelCodec`'s space-to-depth, after the padding in time)."""
        _, t, _, _ = self.latent_shape(*video.shape[2:])
        if t * self.temporal_factor > video.shape[2]:
            still = video[:, :, -1:].expand(-1, -1, t * self.temporal_factor - video.shape[2], -1, -1)
            video = torch.cat([video, still], dim=2)
        return rearrange(self.pixels.encode(video.float()), "b d t h w -> b t h w d")

    @torch.no_grad()
    def fit(self, videos: Sequence[torch.Tensor], max_refine_steps: int | None = None) -> int:
        """Fit μ, B and σ on batches of clips [N, 3, T, H, W] in [-1, 1] (their patches are the samples; the
        batches may differ in size), then g when `refine` > 0, for `refine_steps` or `max_refine_steps` if fewer
        (a run's own step budget). Returns g's steps (0 without one)."""
        patches = torch.cat([self._patches(v.cpu()).reshape(-1, self.patch_values) for v in videos])
        if patches.shape[0] < self.latent_channels:
            raise ValueError(f"PCACodec.fit: {patches.shape[0]} patches cannot give {self.latent_channels} components")
        mean = patches.mean(0)
        _, _, directions = torch.linalg.svd(patches - mean, full_matrices=False)
        basis = directions[: self.latent_channels]
        coefficients = (patches - mean) @ basis.T
        self.mean.copy_(mean)
        self.basis.copy_(basis)
        variance = coefficients.pow(2).mean(0).clamp_min(1e-12)
        shape = variance.pow(self.whiten / 2)
        self.scale.copy_(shape * (variance / shape.pow(2)).mean().sqrt().clamp_min(1e-6))
        if not self.refiner_shapes:
            return 0
        steps = self.refine_steps if max_refine_steps is None else min(self.refine_steps, max_refine_steps)
        self._fit_refiner(torch.cat([v.cpu().float() for v in videos]), steps)
        return steps

    def _fit_refiner(self, clips: torch.Tensor, steps: int, batch_size: int = 32, lr: float = 3e-3) -> None:
        """Fit g (see the class docstring) on clips [N, 3, T, H, W]: L1 between the refined decode of their
        noised latents and the clips, AdamW with a one-cycle rate; g starts as zero (the linear decode)."""
        latents = self.encode(clips)
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            torch.manual_seed(0)
            weights = {}
            for name, shape in self.refiner_shapes.items():  # Conv2d's bound for the weights; biases, last layer 0
                bound = 1 / math.sqrt(math.prod(shape[1:])) if name in ("refine_w1", "refine_w2") else 0.0
                weights[name] = torch.empty(shape).uniform_(-bound, bound).requires_grad_()
            optimizer = torch.optim.AdamW(weights.values(), lr=lr, weight_decay=0.0)
            schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=max(steps, 1), pct_start=0.1)
            for _ in tqdm(range(steps), desc="[codec] fitting the refined decode", leave=False):
                pick = torch.randint(0, len(clips), (min(batch_size, len(clips)),))
                noisy = latents[pick] + self.refine_noise * torch.randn_like(latents[pick])
                patches = self._linear_patches(noisy) + self._refinement(noisy, weights)
                decoded = self.pixels.decode(rearrange(patches, "b t h w d -> b d t h w"), clips.shape[2])
                loss = (decoded - clips[pick]).abs().mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
        for name, weight in weights.items():
            getattr(self, name).copy_(weight.detach())

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        scale = state_dict.get(prefix + "scale")
        if scale is not None and scale.dim() == 0:  # checkpoints before `whiten` held one scale for all components
            state_dict[prefix + "scale"] = scale.expand(self.latent_channels).clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _check_fitted(self) -> None:
        if not self.fitted:
            raise RuntimeError("PCACodec is not fitted: train from the datamodule (GenerationModule.setup fits it) "
                               "or load a checkpoint that holds its basis")

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        z = (self._patches(video) - self.mean) @ self.basis.T / self.scale
        return rearrange(z, "b t h w k -> b k t h w")

    def decode(self, latent: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        self._check_fitted()
        patches = self._linear_patches(latent.float())
        if self.refiner_shapes:
            patches = patches + self._refinement(latent.float(), {n: getattr(self, n) for n in self.refiner_shapes})
        return self.pixels.decode(rearrange(patches, "b t h w d -> b d t h w"), num_frames)

    def _linear_patches(self, latent: torch.Tensor) -> torch.Tensor:
        """Bᵀ·(σ ⊙ z) + μ of latents [B, K, T', H', W'] as patches [B, T', H', W', D]."""
        return (rearrange(latent, "b k t h w -> b t h w k") * self.scale) @ self.basis + self.mean

    @staticmethod
    def _refinement(latent: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        """g(z) of latents [B, K, T', H', W'] as patches [B, T', H', W', D], with g's `weights` by buffer name."""
        x = rearrange(latent, "b k t h w -> (b t) k h w")
        x = F.gelu(F.conv2d(x, weights["refine_w1"], weights["refine_b1"], padding=1))
        x = F.gelu(F.conv2d(x, weights["refine_w2"], weights["refine_b2"], padding=1))
        x = F.conv2d(x, weights["refine_w3"], weights["refine_b3"])
        return rearrange(x, "(b t) d h w -> b t h w d", b=latent.shape[0])


class TAECodec(nn.Module):
    """A frozen `TAE` loaded from `checkpoint` (see the module docstring).

    Args:
        net: the TAE, built with the same config it was trained with (e.g. conf/model/tae_tiny.yaml's `net`).
        checkpoint: a Lightning checkpoint of `AutoencoderModule` or a state dict of the TAE; None leaves the
            random initialisation (only useful in tests).
        tiled: decode in temporal tiles (the TAE's inference path) with `tile` latent frames, `overlap` of them.
    """

    def __init__(self, net: TAE, checkpoint: str | None = None, tiled: bool = False, tile: int = 4,
                 overlap: int = 2) -> None:
        super().__init__()
        object.__setattr__(self, "net", net)  # not registered: see the module docstring
        self.tiled, self.tile, self.overlap = tiled, tile, overlap
        if checkpoint is not None:
            self.load(checkpoint)
        self.net.eval().requires_grad_(False)
        self.latent_channels = net.latent_channels
        self.spatial_factor, self.temporal_factor = net.spatial_factor, net.temporal_factor

    def load(self, checkpoint: str) -> None:
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"TAECodec: checkpoint={checkpoint} is not a file (train one with experiment=tae_tiny)")
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        net_state = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")} or state
        self.net.load_state_dict(net_state)

    def _on(self, device: torch.device) -> TAE:
        if next(self.net.parameters()).device != device:
            self.net.to(device)
        return self.net

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        s = self.spatial_factor
        if height % s or width % s:
            raise ValueError(f"TAECodec: H, W = {height}, {width} must be multiples of {s}")
        return self.latent_channels, self.net.num_latent_frames(frames), height // s, width // s

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        return self._on(video.device).encode(video).mode()

    @torch.no_grad()
    def decode(self, latent: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        net = self._on(latent.device)
        if num_frames is None:
            num_frames = 1 if latent.shape[2] == 1 else latent.shape[2] * self.temporal_factor
        if self.tiled and latent.shape[2] > self.tile:
            return net.decode_tiled(latent, num_frames, self.tile, self.overlap)
        return net.decode(latent, num_frames)


def compression(codec: nn.Module, frames: int, height: int, width: int) -> float:
    """Pixel values per latent value for a clip of this size."""
    return 3 * frames * height * width / math.prod(codec.latent_shape(frames, height, width))
