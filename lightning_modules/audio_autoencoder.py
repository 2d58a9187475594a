"""Training the audio autoencoder of Movie Gen Audio (DAC-VAE, `nn.audio_ae.AudioVAE`), in the pattern of the TAE's
module (`autoencoder.AutoencoderModule`): posterior sample → decode → reconstruction + KL; held-out figures.

Batches: "audio" float32 [B, c, S] in [-1, 1] and "sample_rate" (the datamodules' schema: `AudioDataModule`,
or `AudioVideoDataModule` whose "video" is ignored).

    loss = w_wave·mean|x̂ − x| + w_stft·STFT(x̂, x) + β·KL(q(z|x) ‖ N(0, I))

(STFT: the multi-resolution distance of `evaluation.audio`; no adversarial term, unlike DAC.) Logged:
`train/loss`, `train/wave`, `train/stft`, `train/kl`; at validation and test on held-out clips (posterior mean):
`<stage>/stft` and `<stage>/si_sdr` (dB) of the reconstruction, beside the floor of another clip's audio
(`<stage>/stft_shuffled`, `<stage>/si_sdr_shuffled`), and the latent's statistics `<stage>/latent_mean`,
`<stage>/latent_std` (what a generator over these latents normalises with). Media (`callbacks.media.MediaLogger`):
"real" and "reconstruction" wavs and their spectrograms.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_modules.base import BaseModule, OptimizerFactory, SchedulerFactory
from lightning_modules.evaluation.audio import multi_resolution_stft_distance, si_sdr
from lightning_modules.nn.audio_ae import AudioVAE, ResidualUnit


class AudioAutoencoderModule(BaseModule):
    """See the module docstring.

    Args:
        net: the `AudioVAE`.
        wave_weight, stft_weight, kl_weight: w_wave, w_stft, β.
        sample_posterior: train on z ~ q(z|x) (else on its mean).
        media_max: clips in `media_samples`.
    """

    def __init__(self, net: AudioVAE, optimizer: OptimizerFactory, scheduler: SchedulerFactory | None = None,
                 scheduler_interval: str = "step", wave_weight: float = 1.0, stft_weight: float = 1.0,
                 kl_weight: float = 1e-4, sample_posterior: bool = True, media_max: int = 4) -> None:
        super().__init__(optimizer, scheduler, scheduler_interval)
        self.net = net
        self.wave_weight, self.stft_weight, self.kl_weight = wave_weight, stft_weight, kl_weight
        self.sample_posterior, self.media_max = sample_posterior, media_max
        self.media_sample_rate: int | None = None

    def shard_units(self) -> list[nn.Module]:
        return [m for m in self.net.modules() if isinstance(m, ResidualUnit)]

    def losses(self, audio: torch.Tensor, sample: bool) -> dict[str, torch.Tensor]:
        """The loss and its terms on audio [B, c, S]."""
        x_hat, posterior = self.net(audio, sample=sample)
        terms = {"wave": (x_hat - audio).abs().mean(), "stft": multi_resolution_stft_distance(x_hat, audio),
                 "kl": posterior.kl()}
        terms["loss"] = (self.wave_weight * terms["wave"] + self.stft_weight * terms["stft"]
                         + self.kl_weight * terms["kl"])
        return terms

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        audio = batch["audio"].float()
        terms = self.losses(audio, self.sample_posterior)
        for name, value in terms.items():
            self.log(f"train/{name}", value.detach(), prog_bar=name == "loss", batch_size=audio.shape[0])
        return terms["loss"]

    @torch.no_grad()
    def reconstruct(self, audio: torch.Tensor) -> torch.Tensor:
        """x̂ = Dec(mean of q(z|x)), S samples."""
        return self.net.decode(self.net.encode(audio).mode(), audio.shape[-1])

    def _evaluate(self, batch: dict[str, Any], stage: str) -> None:
        audio = batch["audio"].float()
        self.media_sample_rate = int(batch["sample_rate"])
        z = self.net.encode(audio).mode()
        x_hat = self.net.decode(z, audio.shape[-1])
        other = audio.roll(1, dims=0)
        b = audio.shape[0]
        figures = {"stft": multi_resolution_stft_distance(x_hat, audio), "si_sdr": si_sdr(x_hat, audio).mean(),
                   "latent_mean": z.mean(), "latent_std": z.std()}
        if b > 1:
            figures |= {"stft_shuffled": multi_resolution_stft_distance(other, audio),
                        "si_sdr_shuffled": si_sdr(other, audio).mean()}
        for name, value in figures.items():
            self.log(f"{stage}/{name}", value, batch_size=b, sync_dist=True, prog_bar=name == "si_sdr")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    @torch.no_grad()
    def media_samples(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """{"real": audio [B, c, S], "reconstruction": x̂}, B <= media_max (wavs and spectrograms)."""
        self.media_sample_rate = int(batch["sample_rate"])
        audio = batch["audio"][: self.media_max].to(self.device).float()
        return {"real": audio, "reconstruction": self.reconstruct(audio)}
