"""What the stream needs from a modality: a `Source` (shards + `SampleHandler` + weight), the `Bucket` a handler
puts each sample in, and `SkipSample`, which a handler raises to drop a sample (counted by its reason).

Buckets: a handler maps each raw sample to a `Bucket` (e.g. 64x64x16 frames) with its own batch size,
from metadata alone (json fields or a container probe); the stream keeps per-bucket lists and decodes and
emits a batch when a list is full, so a batch never mixes shapes (`datamodules.stream_dataset`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


class SkipSample(Exception):
    """Raised by a handler to skip a sample; `reason` is counted (`stream_dataset.FILTER_REASONS` are not bad)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Bucket:
    """A batch shape: samples of one bucket have equal tensor shapes; `batch_size` samples per batch."""

    name: str
    batch_size: int
    height: int = 0
    width: int = 0
    frames: int = 0
    audio_samples: int = 0


class SampleHandler(Protocol):
    """What a source needs from a modality: bucket from metadata, load in the worker, collate, finalize."""

    def bucket(self, sample: dict[str, Any]) -> Bucket:
        """The sample's bucket, cheaply (json or a container probe); raise SkipSample to drop it."""

    def load(self, sample: dict[str, Any], bucket: Bucket, rng: np.random.Generator) -> dict[str, Any]:
        """Decode to tensors of the bucket's shape (may stay compact, e.g. uint8, until `finalize`); raise
        SkipSample or MediaDecodeError to drop it."""

    def collate(self, items: list[dict[str, Any]], bucket: Bucket) -> dict[str, Any]:
        """Stack decoded items into a batch dict (in the worker)."""

    def finalize(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Last step, in the main process (e.g. uint8 -> float); optional."""


@dataclass
class Source:
    """A shard list with its handler; `weight` is its share of batches when several sources are mixed."""

    shards: list[str]
    handler: SampleHandler
    weight: float = 1.0
    name: str = ""
