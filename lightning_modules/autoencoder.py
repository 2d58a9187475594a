"""Training the temporal autoencoder (TAE) of Movie Gen, and turning shards into a latent cache.

Batches are dicts with "video" float32 [B, 3, T, H, W] in [-1, 1] (an image is T = 1) and optionally "text",
"key", "fps", "meta" (the datamodules' schema).

Training: joint image and video training at a set ratio. Every `image_every`-th step (1 image : 3 video for
`image_every=4`, the paper's interleaving) the step is an image step: one random frame of each clip, a batch of
one-frame videos. Batches that are already images (T = 1) are used as they are. The loss is `TAELoss`
(reconstruction, perceptual-style, KL, outlier penalty, optional discriminator), one optimizer with two
parameter groups ("autoencoder", "discriminator"); the discriminator gets no gradient from the autoencoder's
terms and vice versa, so one backward and one step per batch serve both.

Logged: `train/loss` and every term (`train/rec`, `train/perceptual`, `train/kl`, `train/opl`, ...),
`train/rec_image` / `train/rec_video`; at validation and test on held-out clips (posterior mean, tiled decode
when `tiled_eval`): `<stage>/psnr`, `<stage>/ssim` (torchmetrics, per frame, pixels mapped to [0, 1]),
`<stage>/psnr_image`, `<stage>/ssim_image` (the first frame encoded as an image), `<stage>/rec`, and the latent's
outlier statistics `<stage>/outlier_frac` (positions beyond r standard radii) and `<stage>/outlier_max` (the
largest ‖X_ij − Mean(X)‖ / ‖Std(X)‖).

Media (for `callbacks.media.MediaLogger`): `media_samples(batch)` returns {"reconstruction": input | output
side by side along the width}.

`task=encode` (`run_task`): every split of the datamodule's shard set is encoded to latent shards under
`latent_cache.output_dir` with the text and metadata kept (`datamodules.latent_cache.encode_shards`, which holds
the cache's format); by parts with `latent_cache.part` / `latent_cache.parts` or the launcher's environment
(`datamodules.parts`), merged by `python experiments/make_shards.py merge=true output=<output_dir>`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from datamodules.latent_cache import encode_shards
from datamodules.parts import current_part, open_part, rank_device
from lightning_modules.base import BaseModule, OptimizerFactory, SchedulerFactory
from lightning_modules.nn.tae import TAE, MidBlock, ResBlock, inflate_image_weights
from lightning_modules.tae_losses import TAELoss, frames, outlier_stats


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] → [0, 1] (clamped)."""
    return (x.clamp(-1.0, 1.0) + 1.0) / 2.0


class AutoencoderModule(BaseModule):
    """The TAE's LightningModule.

    Args:
        net: the `TAE`.
        loss: the `TAELoss` (holds the discriminator when there is one).
        image_every: every n-th training step is an image step (0: never).
        sample_posterior: train on z ~ q(z|x) (else on its mean).
        init_from_image: a checkpoint (Lightning, or a plain state dict) of an image autoencoder to inflate into
            `net` (see `inflate_image_weights`); its "net." entries are used.
        tiled_eval: decode held-out clips with `decode_tiled(tile, overlap)` (the inference path).
        media_max: clips in `media_samples`.
        latent_cache: options of `task=encode` (`output_dir`, `splits` and those of
            `datamodules.latent_cache.encode_shards`).
    """

    def __init__(
        self,
        net: TAE,
        loss: TAELoss,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "step",
        image_every: int = 4,
        sample_posterior: bool = True,
        init_from_image: str | None = None,
        tiled_eval: bool = False,
        tile: int = 4,
        overlap: int = 2,
        media_max: int = 4,
        latent_cache: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(optimizer, scheduler, scheduler_interval)
        if image_every < 0:
            raise ValueError(f"model.image_every={image_every} must be >= 0 (0 = no image steps)")
        self.net, self.loss = net, loss
        self.image_every, self.sample_posterior = image_every, sample_posterior
        self.tiled_eval, self.tile, self.overlap = tiled_eval, tile, overlap
        self.media_max = media_max
        self.latent_cache = dict(latent_cache or {})
        self.metrics = nn.ModuleDict(
            {
                f"{stage}_{kind}": metric
                for stage in ("val", "test")
                for kind, metric in (
                    ("psnr", PeakSignalNoiseRatio(data_range=1.0, reduction="elementwise_mean", dim=(1, 2, 3))),
                    ("ssim", StructuralSimilarityIndexMeasure(data_range=1.0)),
                    ("psnr_image", PeakSignalNoiseRatio(data_range=1.0, reduction="elementwise_mean", dim=(1, 2, 3))),
                    ("ssim_image", StructuralSimilarityIndexMeasure(data_range=1.0)),
                )
            }
        )
        if init_from_image:
            self.inflate_from(init_from_image)

    # -- model -------------------------------------------------------------------------------------------------------
    def inflate_from(self, path: str) -> list[str]:
        """Load an image autoencoder's weights into the TAE; returns the temporal parameters left at init."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"model.init_from_image={path}: no such checkpoint file")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        net_state = {k[len("net.") :]: v for k, v in state.items() if k.startswith("net.")} or state
        return inflate_image_weights(self.net, net_state)

    def trainable_parameters(self) -> list[dict[str, Any]]:
        """Parameter groups for the optimizer partial: the autoencoder, and the discriminator if any."""
        groups = [{"params": [p for p in self.net.parameters() if p.requires_grad], "name": "autoencoder"}]
        if self.loss.discriminator is not None:
            groups.append({"params": list(self.loss.discriminator.parameters()), "name": "discriminator"})
        return groups

    def shard_units(self) -> list[nn.Module]:
        """Per-block units for activation checkpointing / FSDP2: the ResBlocks and mid blocks."""
        return [m for m in self.net.modules() if isinstance(m, ResBlock | MidBlock)]

    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of q(z|x) (temporal tiles when `tiled_eval`)."""
        return (self.net.encode_tiled(x, self.tile) if self.tiled_eval else self.net.encode(x)).mode()

    def decode_latent(self, z: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        """Dec(z) with `num_frames` frames (overlapping blended tiles when `tiled_eval`)."""
        if self.tiled_eval:
            return self.net.decode_tiled(z, num_frames, self.tile, self.overlap)
        return self.net.decode(z, num_frames)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """x̂ = Dec(mean of q(z|x)) with exactly T frames."""
        return self.decode_latent(self.encode_latent(x), x.shape[2])

    # -- training ------------------------------------------------------------------------------------------------------
    def is_image_step(self) -> bool:
        return self.image_every > 0 and self.global_step % self.image_every == 0

    def training_input(self, video: torch.Tensor) -> tuple[torch.Tensor, str]:
        """The batch of this step: the clips, or one random frame of each (an image batch) on image steps."""
        if video.shape[2] == 1:
            return video, "image"
        if not self.is_image_step():
            return video, "video"
        index = torch.randint(video.shape[2], (video.shape[0],)).tolist()
        return torch.stack([clip[:, t : t + 1] for clip, t in zip(video, index)]), "image"

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x, kind = self.training_input(batch["video"])
        x_hat, posterior = self.net(x, sample=self.sample_posterior)
        last_layer = self.net.decoder.conv_out.spatial.weight
        loss, terms = self.loss(x, x_hat, posterior, step=self.global_step, last_layer=last_layer)
        batch_size = x.shape[0]
        for name, value in terms.items():
            self.log(f"train/{name}", value.detach(), batch_size=batch_size)
        self.log(f"train/rec_{kind}", terms["rec"].detach(), batch_size=batch_size)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=batch_size)
        return loss

    # -- evaluation ----------------------------------------------------------------------------------------------------
    def _evaluate(self, batch: dict[str, Any], stage: str) -> None:
        x = batch["video"]
        z = self.encode_latent(x)
        x_hat = self.decode_latent(z, x.shape[2])
        batch_size = x.shape[0]
        self.metrics[f"{stage}_psnr"].update(to_unit(frames(x_hat)), to_unit(frames(x)))
        self.metrics[f"{stage}_ssim"].update(to_unit(frames(x_hat)), to_unit(frames(x)))
        self.log(f"{stage}/rec", self.loss.reconstruction(x_hat, x), batch_size=batch_size, sync_dist=True)
        fraction, largest = outlier_stats(z, self.loss.opl_r)
        self.log(f"{stage}/outlier_frac", fraction, batch_size=batch_size, sync_dist=True)
        self.log(f"{stage}/outlier_max", largest, batch_size=batch_size, sync_dist=True, reduce_fx="max")
        image = x[:, :, :1]
        image_hat = self.reconstruct(image)
        self.metrics[f"{stage}_psnr_image"].update(to_unit(frames(image_hat)), to_unit(frames(image)))
        self.metrics[f"{stage}_ssim_image"].update(to_unit(frames(image_hat)), to_unit(frames(image)))
        for kind in ("psnr", "ssim", "psnr_image", "ssim_image"):
            self.log(f"{stage}/{kind}", self.metrics[f"{stage}_{kind}"], batch_size=batch_size, prog_bar=kind == "psnr")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    @torch.no_grad()
    def media_samples(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """{"reconstruction": [B, 3, T, H, 2W]}: input (left) and reconstruction (right), B <= media_max."""
        x = batch["video"][: self.media_max].to(self.device)
        return {"reconstruction": torch.cat([x, self.reconstruct(x).clamp(-1.0, 1.0)], dim=-1)}

    # -- the latent cache ----------------------------------------------------------------------------------------------
    def run_task(self, name: str, trainer: L.Trainer, datamodule: L.LightningDataModule | None, cfg: Any) -> Any:
        """`task=encode`: every split in `latent_cache.splits` of the datamodule's shard set → latent shards in
        `<latent_cache.output_dir>/<split>/` (see `datamodules.latent_cache.encode_shards`); the summary goes to
        MLflow. By parts (`latent_cache.part` / `latent_cache.parts`, else RANK / WORLD_SIZE or a SLURM array, see
        `datamodules.parts.current_part`): this part's range of each split's shards into
        `<split>/parts/<part>/`, a part done before is skipped; then `python experiments/make_shards.py
        merge=true output=<output_dir>` joins them."""
        if name != "encode":
            return super().run_task(name, trainer, datamodule, cfg)
        options = dict(self.latent_cache)
        output_dir = options.pop("output_dir", None)
        splits = options.pop("splits", ["train", "val"])
        part = current_part(options.pop("part", None), options.pop("parts", None))
        if not output_dir:
            raise ValueError("task=encode needs model.latent_cache.output_dir")
        if datamodule is None or not hasattr(datamodule, "urls") or not hasattr(datamodule, "sources"):
            raise ValueError(f"task=encode needs a shard datamodule (datamodules.shard_datamodule.ShardDataModule), got {type(datamodule).__name__}")
        datamodule.setup("encode")
        handler = datamodule.sources(train=False)[0].handler  # deterministic: centre crop, clip start 0
        device = trainer.strategy.root_device
        if part is not None and trainer.num_devices == 1:  # torchrun ranks without a process group: a GPU each
            device = rank_device(device)
        summary = {}
        for split in splits:
            urls = datamodule.urls.get(split)
            if not urls:
                raise ValueError(f"task=encode: the datamodule has no {split!r} shards (it has {sorted(k for k, v in datamodule.urls.items() if v)})")
            folder = Path(output_dir) / split
            if part is not None:
                folder = open_part(folder, part)
                if folder is None:
                    print(f"encode {split}: {part} already done")
                    continue
            index = encode_shards(self.net, urls, handler, folder, device=device, part=part, **options)
            summary[split] = {k: index[k] for k in ("num_samples", "num_shards")} | {"skipped": len(index["skipped"])}
            print(f"encode {split}{f' ({part})' if part else ''}: {summary[split]} -> {folder}")
        if part is not None:
            print(f"{part} done; when every part is: python experiments/make_shards.py merge=true output={output_dir}")
        logger = trainer.logger
        if logger is not None and hasattr(logger, "run_id") and hasattr(logger.experiment, "log_text"):
            logger.experiment.log_text(logger.run_id, json.dumps(summary, indent=1), "latent_cache/summary.json")
        return summary
