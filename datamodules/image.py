"""`ImageDataModule`: text-image pairs from shards (default: the synthetic world's images).

Batches: "video" float32 [B, 3, 1, H, W] in [-1, 1] (an image is a one-frame video), "text" list[str],
"fps" float32 [B] (zeros), "key" list[str], "meta" list[dict]; with `with_masks` "labels" int64 [B, 1, H, W] (label maps).
"""

from __future__ import annotations

from typing import Any

from datamodules.samples import BucketTable, ImageHandler
from datamodules.shard_datamodule import ShardDataModule, plain
from datamodules.sources import Source


class ImageDataModule(ShardDataModule):
    """Images bucketed by aspect ratio into `sizes` ([[h, w], ...]); see `ShardDataModule` for the rest."""

    world_kind = "images"

    def __init__(self, shards: Any = None, val_shards: Any = None, sizes: list[list[int]] | None = None,
                 with_masks: bool = False, random_crop: bool = True, **kwargs: Any) -> None:
        super().__init__(shards, val_shards, **kwargs)
        self.sizes = plain(sizes) or [[64, 64]]
        self.with_masks, self.random_crop = with_masks, random_crop

    def sources(self, train: bool) -> list[Source]:
        table = BucketTable(self.sizes, [1], *self.batching(train), self.scale_batch_size, self.max_batch_size)
        handler = ImageHandler(table, train=train, random_crop=self.random_crop, require_text=self.require_text,
                               with_masks=self.with_masks)
        return [Source(self.urls["train" if train else "val"], handler, 1.0, "image")]
