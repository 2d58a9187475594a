"""The frozen TAE codec of a generator trained on a latent cache (conf/model/codec/tae_cache.yaml).

`tae_codec` is `nn.codecs.TAECodec` with the checkpoint given as a file or as a folder, whose newest
`**/checkpoints/last.ckpt` is used (e.g. `${paths.log_dir}/tae_tiny`: the newest tae_tiny run, as `init_from`
finds a previous stage). The codec records the file it loaded as `codec.checkpoint` (None: random weights);
`datamodules.latents.LatentDataModule` reads it to encode a missing cache with the same TAE, and refuses to
write a cache from random weights.
"""

from __future__ import annotations

from pathlib import Path

from lightning_modules.checkpoint_io import newest_checkpoint
from lightning_modules.nn.codecs import TAECodec
from lightning_modules.nn.tae import TAE


def tae_codec(net: TAE, checkpoint: str | Path | None, missing_ok: bool | int = False, tiled: bool = False,
              tile: int = 4, overlap: int = 2) -> TAECodec:
    """A `TAECodec` of `net` with weights from `checkpoint` (a file, or a folder: its newest last.ckpt).

    With `missing_ok` (the config passes `${trainer.fast_dev_run}`: a wiring check) a missing checkpoint leaves
    the TAE at its random initialisation, with a message; otherwise it is an error that says how to make one.
    """
    path = None
    if checkpoint is not None:
        try:
            path = newest_checkpoint(checkpoint)
        except FileNotFoundError as exc:
            if not missing_ok:
                raise FileNotFoundError(
                    f"model.codec.checkpoint={checkpoint}: no TAE checkpoint (a .ckpt file, or a folder with "
                    "**/checkpoints/last.ckpt); train one first: python experiments/run.py experiment=tae_tiny"
                ) from exc
            print(f"[codec] fast_dev_run: no TAE checkpoint at {checkpoint}; the TAE keeps its random initialisation")
    codec = TAECodec(net, str(path) if path is not None else None, tiled=tiled, tile=tile, overlap=overlap)
    codec.checkpoint = str(path) if path is not None else None
    return codec
