"""Video datamodules: text-video clips (`VideoDataModule`) and text-video-audio clips (`AudioVideoDataModule`).

Batches: "video" float32 [B, 3, T, H, W] in [-1, 1], "text" list[str], "fps" float32 [B], "key" list[str],
"meta" list[dict]; with `with_masks` "labels" int64 [B, T, H, W] (label maps); with `with_target` "target_video" (edit
pairs); with `reference` "reference" [B, 3, S, S] and "reference_from" (identity clips, paired or cross-paired,
`datamodules.references`); `AudioVideoDataModule` adds "audio" float32 [B, C, S] (the clip's time window of the soundtrack,
S = round(T / fps * sample_rate)) and "sample_rate". Images mixed in (`image_ratio` > 0) arrive as their
own batches with T = 1 and fps 0, never mixed with clips inside a batch.
"""

from __future__ import annotations

from typing import Any

from datamodules.samples import BucketTable, ImageHandler, VideoHandler
from datamodules.shard_datamodule import ShardDataModule, plain
from datamodules.sources import Source


class VideoDataModule(ShardDataModule):
    """Text-video clips from shards (default: the synthetic world's scenes), bucketed by aspect and length.

    Args:
        sizes: bucket sizes [[h, w], ...]; a clip goes to the nearest aspect ratio.
        frames: bucket clip lengths (frames at `fps`); a clip goes to the longest that fits.
        fps: frame rate clips are sampled at (None: each clip's native rate).
        image_shards: image shards to mix in (None with image_ratio > 0: the world's images).
        image_ratio: fraction of batches that are image batches.
        with_masks: add the label maps "labels" (needs mask.npz); with_target: add "target_video" (needs edit.mp4).
        fps_in_caption: prefix captions with "FPS-<fps> " (Movie Gen's fps conditioning).
        random_crop: random crop offsets and clip starts in training (centre/0 in validation).
        min_motion_bucket: keep only clips whose json motion_bucket (computed when shards are written) is at
            least this; the others are filtered (Animated Stickers' motion bucketing). None: keep every clip.
        reference: "paired" | "cross" | None: add a reference crop of the clip's identity from the clip itself or
            from another clip of the identity (Movie Gen PT2V; needs `ref.npz`, written with identity clips);
            random in training, a fixed draw per clip in validation. reference_size: its side S in pixels.
        identity_in_caption: False drops the identity's token from identity captions ("The zq3 star ..." → "The
            star ..."), so that only a reference tells who it is (PT2V: the paper's captions describe the person,
            they do not name them; a token would let training identities bypass the reference).
        decode_cache_mb: keep up to this many MB of decoded clips in memory (`samples.ClipCache`; 0: off): a
            small world read for many epochs with `num_workers: 0` is then decoded once.
        **kwargs: the streaming options of `ShardDataModule`.
    """

    world_kind = "scenes"

    def __init__(
        self,
        shards: Any = None,
        val_shards: Any = None,
        sizes: list[list[int]] | None = None,
        frames: list[int] | None = None,
        fps: float | None = 8.0,
        image_shards: Any = None,
        val_image_shards: Any = None,
        image_ratio: float = 0.0,
        with_masks: bool = False,
        with_target: bool = False,
        fps_in_caption: bool = False,
        random_crop: bool = True,
        min_motion_bucket: int | None = None,
        reference: str | None = None,
        reference_size: int = 32,
        identity_in_caption: bool = True,
        decode_cache_mb: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(shards, val_shards, **kwargs)
        self.sizes = plain(sizes) or [[64, 64]]
        self.frames = plain(frames) or [8]
        self.fps = fps
        self.image_shards, self.val_image_shards = plain(image_shards), plain(val_image_shards)
        if not 0.0 <= image_ratio < 1.0:
            raise ValueError(f"image_ratio must be in [0, 1), got {image_ratio}")
        self.image_ratio = float(image_ratio)
        self.with_masks, self.with_target = with_masks, with_target
        self.fps_in_caption, self.random_crop = fps_in_caption, random_crop
        self.min_motion_bucket = min_motion_bucket
        self.reference, self.reference_size = reference, reference_size
        self.identity_in_caption = identity_in_caption
        self.decode_cache_mb = float(decode_cache_mb)

    def extra_urls(self) -> dict[str, list[str] | None]:
        if self.image_ratio <= 0:
            return {}
        return {"image_train": self.resolve(self.image_shards, "images", "train"),
                "image_val": self.resolve(self.val_image_shards, "images", "val")}

    def table(self, frames: list[int], train: bool = True) -> BucketTable:
        return BucketTable(self.sizes, frames, *self.batching(train), self.scale_batch_size, self.max_batch_size)

    def video_handler(self, train: bool) -> VideoHandler:
        return VideoHandler(self.table(self.frames, train), fps=self.fps, train=train, random_crop=self.random_crop,
                            require_text=self.require_text, fps_in_caption=self.fps_in_caption,
                            with_masks=self.with_masks, with_target=self.with_target,
                            min_motion_bucket=self.min_motion_bucket, reference=self.reference,
                            reference_size=self.reference_size, identity_in_caption=self.identity_in_caption,
                            decode_cache_mb=self.decode_cache_mb)

    def sources(self, train: bool) -> list[Source]:
        split = "train" if train else "val"
        sources = [Source(self.urls[split], self.video_handler(train), 1.0 - self.image_ratio, "video")]
        images = self.urls.get(f"image_{split}")
        if self.image_ratio > 0:
            if not images:
                raise ValueError("image_ratio > 0 needs image_shards (and val_image_shards for validation)")
            table = BucketTable(self.sizes, [1], self.batching(train)[0], {}, self.scale_batch_size,
                                self.max_batch_size)
            handler = ImageHandler(table, train=train, random_crop=self.random_crop,
                                   require_text=self.require_text, with_masks=self.with_masks)
            sources.append(Source(images, handler, self.image_ratio, "image"))
        return sources


class AudioVideoDataModule(VideoDataModule):
    """Text-video clips with their soundtrack (wav/flac beside the video, else the video's audio track).

    Args:
        sample_rate: audio rate of "audio"; audio_channels: 1 (mono mix) or 2.
        fps: must be set (equal clip lengths give equal audio lengths).
        **kwargs: the options of `VideoDataModule` (no image mixing: images have no sound).
    """

    def __init__(self, *args: Any, sample_rate: int = 16000, audio_channels: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.image_ratio > 0:
            raise ValueError("AudioVideoDataModule cannot mix in images (they have no audio); set image_ratio=0")
        if not self.fps:
            raise ValueError("AudioVideoDataModule needs a fixed fps")
        self.sample_rate, self.audio_channels = int(sample_rate), int(audio_channels)

    def video_handler(self, train: bool) -> VideoHandler:
        return VideoHandler(self.table(self.frames, train), fps=self.fps, train=train, random_crop=self.random_crop,
                            require_text=self.require_text, fps_in_caption=self.fps_in_caption,
                            with_masks=self.with_masks, with_target=self.with_target,
                            audio_rate=self.sample_rate, audio_channels=self.audio_channels,
                            decode_cache_mb=self.decode_cache_mb)
