"""The audio autoencoder of Movie Gen Audio (arXiv 2410.13720 §6): DAC (Descript Audio Codec) with its residual
vector quantiser replaced by a VAE bottleneck, giving continuous latents at a fixed frame rate.

    encoder:  Conv1d(1 → w, 7) → per stride s_i: [ResUnit(dil 1), ResUnit(dil 3), ResUnit(dil 9)] at width c_i,
              Snake, Conv1d(c_i → 2c_i, kernel 2s_i, stride s_i)  → Snake → Conv1d(→ 2C, 3): (μ, log σ²)
    decoder:  Conv1d(C → c, 7) → per stride (reversed): Snake, ConvTranspose1d(c → c/2, kernel 2s, stride s),
              [ResUnit ×3] → Snake → Conv1d(→ 1, 7) → tanh
    ResUnit:  x + Conv1d_1x1(Snake(Conv1d_7,dil(Snake(x))))
    Snake:    snake(x) = x + sin²(α x) / α, α learnable per channel (DAC's periodic activation)

hop = Π s_i samples per latent frame: latent rate = sample_rate / hop (the paper: 48 kHz → 25 Hz, hop 1920;
the CPU config: 8 kHz → 50 Hz, hop 160). A waveform [B, 1, S] gives q(z|x) over [B, C, ceil(S / hop)] (S is
zero-padded to a multiple of hop); `decode(z, S)` cuts the output back to S samples.

`AudioCodec` presents a frozen AudioVAE to the generation core as a codec whose latent is a one-pixel video,
[B, C, T, 1, 1], so the DiT runs on it unchanged with patch (1, 1, 1): one token per latent frame.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from einops import rearrange
from torch import nn

from lightning_modules.checkpoint_io import newest_checkpoint
from lightning_modules.nn.tae import DiagonalGaussian


class Snake(nn.Module):
    """snake(x) = x + sin²(α·x) / α, α [C] learnable (initialised to 1)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha
        return x + torch.sin(alpha * x).pow(2) / (alpha + 1e-9)


class ResidualUnit(nn.Module):
    """x + Conv1x1(Snake(Conv7,dilation(Snake(x)))) (length-preserving)."""

    def __init__(self, channels: int, dilation: int) -> None:
        super().__init__()
        self.block = nn.Sequential(Snake(channels), nn.Conv1d(channels, channels, 7, dilation=dilation,
                                                              padding=3 * dilation),
                                   Snake(channels), nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


def _residual_stack(channels: int) -> list[nn.Module]:
    return [ResidualUnit(channels, d) for d in (1, 3, 9)]


class AudioVAE(nn.Module):
    """See the module docstring.

    Args:
        channels: audio channels (1: mono).
        width: channels after the first conv (doubled at every downsampling).
        strides: the downsampling factors, hop = their product.
        latent_channels: C.
    """

    def __init__(self, channels: int = 1, width: int = 16, strides: Sequence[int] = (4, 5, 8),
                 latent_channels: int = 8) -> None:
        super().__init__()
        self.channels, self.latent_channels = channels, latent_channels
        self.strides = tuple(int(s) for s in strides)
        if not self.strides or min(self.strides) < 1:
            raise ValueError(f"AudioVAE: strides={list(strides)} must be positive integers")
        self.hop = math.prod(self.strides)
        encoder: list[nn.Module] = [nn.Conv1d(channels, width, 7, padding=3)]
        c = width
        for s in self.strides:
            encoder += [*_residual_stack(c), Snake(c), nn.Conv1d(c, 2 * c, 2 * s, stride=s, padding=math.ceil(s / 2))]
            c *= 2
        encoder += [Snake(c), nn.Conv1d(c, 2 * latent_channels, 3, padding=1)]
        self.encoder = nn.Sequential(*encoder)
        decoder: list[nn.Module] = [nn.Conv1d(latent_channels, c, 7, padding=3)]
        for s in reversed(self.strides):
            decoder += [Snake(c), nn.ConvTranspose1d(c, c // 2, 2 * s, stride=s, padding=math.ceil(s / 2),
                                                     output_padding=s % 2), *_residual_stack(c // 2)]
            c //= 2
        decoder += [Snake(c), nn.Conv1d(c, channels, 7, padding=3), nn.Tanh()]
        self.decoder = nn.Sequential(*decoder)
        self.init_weights()

    def init_weights(self) -> None:
        """Variance-preserving convolutions, w ~ N(0, 1 / fan_in) (fan_in = C_in·k; C_in·k / s for a transposed
        conv of stride s, whose outputs each see k / s taps), zero biases; the last conv of every residual unit
        zero (each unit starts as the identity) and the output conv scaled by 0.1. PyTorch's default init
        (std ≈ 1 / sqrt(3·fan_in)) shrinks the signal ~√3 per conv: through this stack the decoder's output and
        gradients start ~100x too small and a short CPU training learns nothing (SI-SDR stuck below -60 dB)."""
        for m in self.modules():
            if isinstance(m, nn.ConvTranspose1d):
                fan_in = m.weight.shape[0] * m.weight.shape[2] / m.stride[0]
            elif isinstance(m, nn.Conv1d):
                fan_in = m.weight.shape[1] * m.weight.shape[2]
            else:
                continue
            nn.init.normal_(m.weight, std=fan_in ** -0.5)
            nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, ResidualUnit):
                nn.init.zeros_(m.block[-1].weight)
        with torch.no_grad():
            self.decoder[-2].weight.mul_(0.1)

    def num_latent_frames(self, samples: int) -> int:
        """ceil(samples / hop)."""
        return -(-int(samples) // self.hop)

    def latent_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The planner's view (`experiments/plan.py`, audio as a 1×1 video of S "frames" = samples):
        [B, c, S, 1, 1] → (B, C, ceil(S / hop), 1, 1)."""
        return shape[0], self.latent_channels, self.num_latent_frames(shape[2]), *shape[3:]

    def _check(self, audio: torch.Tensor) -> None:
        if audio.ndim != 3 or audio.shape[1] != self.channels:
            raise ValueError(f"AudioVAE expects audio [B, {self.channels}, S], got {tuple(audio.shape)}")

    def encode(self, audio: torch.Tensor) -> DiagonalGaussian:
        """q(z|x) over [B, C, ceil(S / hop)] for audio [B, channels, S] in [-1, 1]."""
        self._check(audio)
        pad = self.num_latent_frames(audio.shape[-1]) * self.hop - audio.shape[-1]
        mean, logvar = self.encoder(nn.functional.pad(audio, (0, pad))).chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar.clamp(-30.0, 20.0))

    def decode(self, z: torch.Tensor, samples: int | None = None) -> torch.Tensor:
        """Audio [B, channels, samples] (default T·hop) in [-1, 1] from z [B, C, T]."""
        audio = self.decoder(z)
        return audio if samples is None else audio[..., :samples]

    def forward(self, audio: torch.Tensor, sample: bool = True) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(audio)
        z = posterior.sample() if sample else posterior.mode()
        return self.decode(z, audio.shape[-1]), posterior


def load_net_state(checkpoint: str | Path, what: str) -> dict[str, torch.Tensor]:
    """The "net." weights of a Lightning checkpoint (or a plain state dict), or of the newest
    `**/checkpoints/last.ckpt` below a folder; `what` names the option in errors."""
    try:
        path = newest_checkpoint(checkpoint)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{what}={checkpoint}: {exc} (train one with experiment=audio_ae)") from exc
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    return {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")} or state


class AudioCodec(nn.Module):
    """A frozen `AudioVAE` as the generation core's codec (see the module docstring): audio [B, c, S] ↔ latent
    [B, C, T, 1, 1] (posterior mean). `latent_shape(S, 1, 1) = (C, ceil(S / hop), 1, 1)`. Like `TAECodec` the
    network is not a registered submodule: its weights stay out of the generator's checkpoints.

    Args:
        net: the AudioVAE, built as it was trained (conf/model/audio_ae_tiny.yaml's `net`).
        checkpoint: an `experiment=audio_ae` checkpoint, or a folder (its newest last.ckpt); None keeps the random initialisation (tests only).
        sample_rate: the rate the VAE was trained at (latent rate = sample_rate / hop).
    """

    def __init__(self, net: AudioVAE, checkpoint: str | None = None, sample_rate: int = 8000) -> None:
        super().__init__()
        object.__setattr__(self, "net", net)
        if checkpoint is not None:
            net.load_state_dict(load_net_state(checkpoint, "model.codec.checkpoint"))
        net.eval().requires_grad_(False)
        self.latent_channels, self.hop, self.sample_rate = net.latent_channels, net.hop, int(sample_rate)
        self.frame_rate = self.sample_rate / self.hop

    def _on(self, device: torch.device) -> AudioVAE:
        if next(self.net.parameters()).device != device:
            self.net.to(device)
        return self.net

    def latent_shape(self, samples: int, height: int = 1, width: int = 1) -> tuple[int, int, int, int]:
        if height != 1 or width != 1:
            raise ValueError(f"AudioCodec: audio has no height or width (got {height}x{width}; give 1x1)")
        return self.latent_channels, self.net.num_latent_frames(samples), 1, 1

    @torch.no_grad()
    def encode(self, audio: torch.Tensor) -> torch.Tensor:
        """[B, c, S] → [B, C, T, 1, 1]."""
        z = self._on(audio.device).encode(audio.float()).mode()
        return rearrange(z, "b c t -> b c t 1 1")

    @torch.no_grad()
    def decode(self, latent: torch.Tensor, samples: int | None = None) -> torch.Tensor:
        """[B, C, T, 1, 1] → audio [B, c, samples] in [-1, 1]."""
        return self._on(latent.device).decode(rearrange(latent, "b c t 1 1 -> b c t"), samples)
