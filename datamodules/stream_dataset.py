"""The worker side of the shard stream: `StreamDataset` yields batches forever for the slot a DataLoader worker plays.

Pipeline (per rank)
-------------------
  shard URLs (`datamodules.shards`) -> per (rank, worker) slot an endless seeded shard schedule
  (`datamodules.shard_schedule`) -> tar members read with `read_shard`, grouped by key (only media/text/json/npz
  members are read; nothing is unpickled) -> seeded shuffle buffer -> per-source bucketing (`datamodules.sources`)
  -> decode (PyAV, in the worker; frames stay uint8) -> one batch per bucket fill, in shared memory
  -> `torch.utils.data.DataLoader(batch_size=None, num_workers=W)` -> `ShardLoader` (`datamodules.stream_loader`:
  the handler's `finalize`, e.g. uint8 -> float32, in the main process), which yields exactly
  `batches_per_epoch` batches per rank (the "resampled shards + with_epoch on the loader" pattern: every
  rank steps the same number of times, so DDP never waits on a rank that ran out of data).

The shuffle buffer (seeded by seed, epoch, slot) is flushed at pass boundaries so passes never mix. Several
sources (e.g. videos and images) are mixed per batch: before each batch a seeded draw picks the source with
probability equal to its weight.

Bad samples: a corrupt/undecodable video or audio, a zero-length clip, a sample without caption, a
truncated or unreadable tar are skipped and counted by reason (a broken tar counts every sample it loses: the
shard's count in index.json minus those read before the break; 1 when the count is unknown); "too_short" (no bucket fits) counts as
filtered, not bad. Counts are exposed by `ShardLoader.metrics()` as data/seen, data/bad, data/filtered,
data/skipped, data/bad_fraction, data/skipped/<reason>. Once at least `min_samples` were seen, a bad
fraction above `max_bad_fraction` stops the run with `BadDataError` naming the shard and the sample key of
the last bad sample.

Everything a worker does is a deterministic function of (seed, epoch, slot) and the data; the per-sample
crop/start draws are seeded by (seed, epoch, slot, source, ordinal). A `Plan` tells each worker where to start:
to resume, it fast-forwards its slot (re-reads, re-shuffles and re-buckets, but does not decode) and drops
known-bad samples by ordinal (see `datamodules.stream_loader`).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from datamodules.media import MediaDecodeError
from datamodules.shard_schedule import mix_seed, shard_schedule
from datamodules.shards import ShardCache, ShardReadError, read_shard, shard_sample_counts
from datamodules.sources import SkipSample, Source

FILTER_REASONS = frozenset({"too_short", "low_motion"})  # skip reasons that count as filtered, not bad
STREAM_INFO = "_stream"  # the batch entry that carries a worker's bookkeeping to the loader


class BadDataError(RuntimeError):
    """Too many bad samples (or none usable); the message names the shard and key of the last bad sample."""


@dataclass
class Plan:
    """Where a loader iteration starts: set by the loader in the main process, read by each worker."""

    epoch: int = 0
    rank: int = 0
    world: int = 1
    rotation: int = 0  # DataLoader worker w plays logical slot (w + rotation) % W
    skip: dict[int, int] = field(default_factory=dict)  # logical slot -> batches to fast-forward
    bad: dict[int, set[tuple[int, int]]] = field(default_factory=dict)  # logical slot -> {(source, ordinal)}


class _SlotStream:
    """Samples of one source for one slot: endless, seeded shuffle buffer flushed at pass boundaries."""

    def __init__(self, dataset: StreamDataset, source_index: int, epoch: int, slot: int, num_slots: int) -> None:
        self.dataset, self.source_index = dataset, source_index
        self.epoch, self.slot, self.num_slots = epoch, slot, num_slots
        self.errors: list[ShardReadError] = []
        self.ordinal = 0

    def __iter__(self) -> Iterator[tuple[int, dict]]:
        ds = self.dataset
        urls = ds.sources[self.source_index].shards
        rng = random.Random(mix_seed(ds.seed, self.epoch, self.slot, self.source_index, "buffer"))
        buffer: list[dict] = []
        size = ds.shuffle_buffer if ds.shuffle else 0
        current_pass, empty_urls = 0, set()

        def pop() -> dict:
            i = rng.randrange(len(buffer))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            return buffer.pop()

        def emit(sample: dict) -> tuple[int, dict]:
            self.ordinal += 1
            return self.ordinal - 1, sample

        schedule = shard_schedule(len(urls), ds.seed, self.epoch, self.slot, self.num_slots, ds.shuffle)
        reader = ds.shard_cache.read if ds.shard_cache is not None else read_shard
        for pass_index, shard in schedule:
            if pass_index != current_pass:
                while buffer:
                    yield emit(pop())
                current_pass = pass_index
            got = 0
            try:
                for sample in reader(urls[shard]):
                    got += 1
                    if size <= 1:
                        yield emit(sample)
                        continue
                    buffer.append(sample)
                    if len(buffer) >= size:
                        yield emit(pop())
            except ShardReadError as exc:
                # Every sample the shard holds beyond those read is lost: the one being read at the break and
                # all after it (the count comes from the shard set's index; unknown: at least the one).
                expected = ds.shard_counts(self.source_index)  # read only when a shard breaks
                exc.lost = max(1, (expected[shard] if expected else 0) - got)
                self.errors.append(exc)
            empty_urls = set() if got else empty_urls | {urls[shard]}
            if len(empty_urls) == len(set(urls)):
                raise BadDataError(
                    f"no readable samples in any shard of source {ds.sources[self.source_index].name or self.source_index}"
                    f" ({len(urls)} shards, e.g. {urls[0]})"
                    + (f"; last error: {self.errors[-1]}" if self.errors else "")
                )


class StreamDataset(IterableDataset):
    """The worker-side pipeline: yields batches (dicts) forever for the slot this worker plays (see module doc)."""

    def __init__(
        self,
        sources: Sequence[Source],
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 256,
        max_bad_fraction: float = 0.05,
        min_samples: int = 64,
        samples_hint: int | None = None,
        shard_cache_mb: float = 0.0,
    ) -> None:
        super().__init__()
        if not sources:
            raise ValueError("at least one source is required")
        self.sources = list(sources)
        weights = np.array([max(0.0, float(s.weight)) for s in self.sources])
        if weights.sum() <= 0:
            raise ValueError(f"source weights must have a positive sum, got {weights.tolist()}")
        self.weights = weights / weights.sum()
        self.seed, self.shuffle, self.shuffle_buffer = int(seed), bool(shuffle), int(shuffle_buffer)
        self.max_bad_fraction, self.min_samples = float(max_bad_fraction), int(min_samples)
        self.samples_hint = samples_hint
        # shards kept in memory by the reading process (`shards.ShardCache`); a per-epoch copy of the dataset
        # shares it, so with num_workers 0 it lasts the run
        self.shard_cache = ShardCache(shard_cache_mb) if shard_cache_mb > 0 else None
        self.plan = Plan()
        self._counts: dict[int, list[int] | None] = {}

    def shard_counts(self, source_index: int) -> list[int] | None:
        """Samples per shard of a source (from its index.json, or by listing local tars; None if unknown)."""
        if source_index not in self._counts:
            self._counts[source_index] = shard_sample_counts(self.sources[source_index].shards)
        return self._counts[source_index]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        plan = self.plan
        logical = (worker + plan.rotation) % workers
        slot, num_slots = plan.rank * workers + logical, plan.world * workers
        skip, known_bad = plan.skip.get(logical, 0), plan.bad.get(logical, set())
        streams = [_SlotStream(self, i, plan.epoch, slot, num_slots) for i in range(len(self.sources))]
        iterators = [iter(s) for s in streams]
        pending: list[dict[str, list]] = [{} for _ in self.sources]
        choose = np.random.default_rng(mix_seed(self.seed, plan.epoch, slot, "sources"))
        counts: Counter = Counter()
        events: list[dict] = []
        seen_since_batch = 0
        limit = 2 * (self.samples_hint or 50000) + 1000
        index = 0

        def record(source: int, ordinal: int | None, url: str, key: str | None, reason: str, detail: str,
                   n: int = 1) -> None:
            counts[f"skipped/{reason}"] += n
            counts["filtered" if reason in FILTER_REASONS else "bad"] += n
            events.append({"source": source, "ordinal": ordinal, "url": url, "key": key, "reason": reason,
                           "detail": detail[:300]})
            bad, seen = counts["bad"], max(1, counts["seen"])
            if reason not in FILTER_REASONS and seen >= self.min_samples and bad / seen > self.max_bad_fraction:
                raise BadDataError(bad_message(bad, seen, self.max_bad_fraction, events[-1]))

        while True:
            fast = index < skip
            s = int(choose.choice(len(self.sources), p=self.weights)) if len(self.sources) > 1 else 0
            handler, buckets = self.sources[s].handler, pending[s]
            while True:
                ordinal, sample = next(iterators[s])
                for error in streams[s].errors:
                    if not fast:
                        lost = getattr(error, "lost", 1)
                        counts["seen"] += lost
                        record(s, None, error.url, error.key, "bad_shard", f"{error.detail}; {lost} samples lost", lost)
                streams[s].errors.clear()
                seen_since_batch += 1
                if seen_since_batch > limit:
                    raise BadDataError(f"no batch after {seen_since_batch} samples in a row: every sample is skipped"
                                       f" or fits no bucket; skipped so far: {dict(counts)}")
                if fast and (s, ordinal) in known_bad:
                    continue
                if not fast:
                    counts["seen"] += 1
                try:
                    bucket = handler.bucket(sample)
                except Exception as exc:  # noqa: BLE001 - any failure on one sample skips (and counts) it
                    if not fast:
                        record(s, ordinal, sample["__url__"], sample["__key__"], *_reason(exc))
                    continue
                waiting = buckets.setdefault(bucket.name, [])
                waiting.append([ordinal, sample, None])
                if len(waiting) < bucket.batch_size:
                    continue
                if fast:
                    waiting.clear()
                    break
                for item in waiting:
                    if item[2] is None:
                        rng = np.random.default_rng(mix_seed(self.seed, plan.epoch, slot, s, item[0]))
                        try:
                            item[2] = handler.load(item[1], bucket, rng)
                        except Exception as exc:  # noqa: BLE001 - any failure on one sample skips (and counts) it
                            item[2] = False
                            record(s, item[0], item[1]["__url__"], item[1]["__key__"], *_reason(exc))
                waiting[:] = [item for item in waiting if item[2] is not False]
                if len(waiting) == bucket.batch_size:
                    break
            seen_since_batch = 0
            if fast:
                index += 1
                continue
            batch = handler.collate([item[2] for item in waiting], bucket)
            batch["key"] = [item[1]["__key__"] for item in waiting]
            batch[STREAM_INFO] = {"slot": logical, "index": index, "events": events, "counts": dict(counts),
                              "bucket": bucket.name, "source": s}
            waiting.clear()
            events, counts = [], Counter()
            index += 1
            yield batch


def _reason(exc: Exception) -> tuple[str, str]:
    """(reason, detail) of a per-sample failure: typed skips keep theirs, anything else is "error:<Type>"."""
    if isinstance(exc, SkipSample | MediaDecodeError):
        return exc.reason, exc.detail
    if isinstance(exc, BadDataError):
        raise exc
    return f"error:{type(exc).__name__}", str(exc)


def bad_message(bad: int, seen: int, limit: float, event: dict) -> str:
    """The error text when the bad fraction is exceeded: counts and the last bad sample's shard and key."""
    return (
        f"{bad} of {seen} samples were bad ({bad / seen:.1%} > max_bad_fraction={limit:.1%}); last bad sample:"
        f" shard {event['url']} key {event['key']}: {event['reason']} {event['detail']}".rstrip()
    )
