"""`AudioDataModule`: text-audio clips from shards (default: the synthetic world's scene soundtracks).

Batches: "audio" float32 [B, C, S] in [-1, 1] (S = duration bucket x sample_rate), "sample_rate" int,
"text" list[str] (the json's `caption_key` field when present, e.g. the world's "audio_caption", else txt),
"key" list[str], "meta" list[dict].
"""

from __future__ import annotations

from typing import Any

from datamodules.samples import AudioHandler
from datamodules.shard_datamodule import ShardDataModule, plain
from datamodules.sources import Source


class AudioDataModule(ShardDataModule):
    """Audio clips bucketed by duration (seconds) into `durations`; see `ShardDataModule` for the rest.

    Args:
        durations: clip lengths in seconds; a track goes to the longest that fits ("too_short" otherwise).
        sample_rate / channels: output rate and channel count (1 = mono mix, 2 = stereo).
        caption_key: json field used as caption when present (None: always txt).
        from_video: read a video's audio track when a sample has no wav/flac.
    """

    world_kind = "scenes"

    def __init__(self, shards: Any = None, val_shards: Any = None, durations: list[float] | None = None,
                 sample_rate: int = 16000, channels: int = 1, caption_key: str | None = "audio_caption",
                 from_video: bool = True, **kwargs: Any) -> None:
        super().__init__(shards, val_shards, **kwargs)
        self.durations = plain(durations) or [1.0]
        self.sample_rate, self.channels = int(sample_rate), int(channels)
        self.caption_key, self.from_video = caption_key, from_video

    def sources(self, train: bool) -> list[Source]:
        handler = AudioHandler(self.durations, self.sample_rate, self.channels, *self.batching(train),
                               self.scale_batch_size, self.max_batch_size, train=train,
                               require_text=self.require_text, caption_key=self.caption_key,
                               from_video=self.from_video)
        return [Source(self.urls["train" if train else "val"], handler, 1.0, "audio")]
