"""Streaming WebDataset shards into training: shard lists, node/worker split, shuffles, buckets, bad samples, resume.

Pipeline (per rank)
-------------------
  shard URLs (local paths, brace lists "a-{000..009}.tar", "pipe:cmd", http(s):// via curl; a folder with an
  index.json) -> per (rank, worker) slot an endless seeded shard schedule -> tar members read with
  `webdataset.gopen`, grouped by key (only media/text/json/npz members are read; nothing is unpickled) ->
  seeded shuffle buffer -> per-source bucketing -> decode (PyAV, in the worker; frames stay uint8) -> one
  batch per bucket fill, in shared memory -> `torch.utils.data.DataLoader(batch_size=None, num_workers=W)`
  -> `ShardLoader` (the handler's `finalize`, e.g. uint8 -> float32, in the main process), which yields exactly
  `batches_per_epoch` batches per rank (the "resampled shards + with_epoch on the loader" pattern: every
  rank steps the same number of times, so DDP never waits on a rank that ran out of data).

Shard schedule: the endless sequence P_0 P_1 P_2 ... of permutations of the shard list, P_p seeded by
(seed, epoch, p) (identity order when shuffle is off). Slot s = rank * W + worker of S = world * W slots
reads positions s, s + S, s + 2S, ... of that sequence. Within one pass every shard goes to exactly one slot,
so ranks and workers read disjoint samples as long as an epoch does not outrun a pass; when a slot's share
is used up it continues with the next pass (a resampled stream), never stalls, and fewer shards than slots is
fine (but then slots share shards: use at least world x workers shards for disjoint samples). The shuffle
buffer (seeded by seed, epoch, slot) is flushed at pass boundaries so passes never mix. `epoch_batches`
gives the default epoch length: the longest for which no worker outruns its share of a pass.

Buckets: a handler maps each raw sample to a `Bucket` (e.g. 64x64x16 frames) with its own batch size,
from metadata alone (json fields or a container probe); samples wait in per-bucket lists and a batch is
decoded and emitted when a list is full, so a batch never mixes shapes. Several sources (e.g. videos and
images) are mixed per batch: before each batch a seeded draw picks the source with probability equal to its
weight.

Bad samples: a corrupt/undecodable video or audio, a zero-length clip, a sample without caption, a
truncated or unreadable tar are skipped and counted by reason; "too_short" (no bucket fits) counts as
filtered, not bad. Counts are exposed by `ShardLoader.metrics()` as data/seen, data/bad, data/filtered,
data/skipped, data/bad_fraction, data/skipped/<reason>. Once at least `min_samples` were seen, a bad
fraction above `max_bad_fraction` stops the run with `BadDataError` naming the shard and the sample key of
the last bad sample.

Resume guarantee: EXACT sample position, for the same shards, seed, world size and number of workers.
Everything a worker does is a deterministic function of (seed, epoch, slot) and the data; the per-sample
crop/start draws are seeded by (seed, epoch, slot, source, ordinal). `ResumableShardLoader.state_dict()`
stores the epoch, how many batches of it were trained (committed when the batch reaches the model, so
Lightning's one-batch prefetch is not counted) and the ordinals of samples that failed to decode. On
`load_state_dict` each worker fast-forwards its slot: it re-reads its shards and re-runs shuffle and bucket
assignment (json metadata, or a container probe), but skips decoding (known-bad samples are dropped by ordinal), then yields the very batches the
uninterrupted run would have yielded next. The cost is reading (not decoding) the part of the epoch already
trained. With a different world size or worker count the stream resumes at the same epoch and batch count,
with different samples. Under DDP each rank's state is gathered into the checkpoint (a collective inside
`state_dict`, which Lightning calls on every rank).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import tarfile
import warnings
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

from datamodules.media import MediaDecodeError

# Members whose last extension is in this set are read; everything else (pyd, pickle, pth, ...) is skipped
# unread, so shard data is never unpickled.
READ_EXTENSIONS = frozenset({"mp4", "webm", "mov", "mkv", "jpg", "jpeg", "png", "wav", "flac", "txt", "json", "npz"})
FILTER_REASONS = frozenset({"too_short"})
RECEIPT = "_receipt"
_STREAM = "_stream"


# ----------------------------------------------------------------------------------------------------------------
# shard lists


def is_local(url: str) -> bool:
    """True for plain paths and file: URLs (not pipe:, http:, s3:, ...)."""
    if url.startswith("pipe:"):
        return False
    scheme = urlparse(url).scheme
    return scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt")


def _local_path(url: str) -> Path:
    return Path(urlparse(url).path if url.startswith("file:") else url)


def expand_shards(spec: str | Path | Sequence[str | Path]) -> list[str]:
    """Shard URLs from a brace pattern ("d/shard-{000000..000009}.tar"), "::"-joined patterns, a list, or a
    folder (its index.json's shards, else its *.tar files in name order)."""
    if isinstance(spec, str | Path):
        spec = [spec]
    urls: list[str] = []
    for item in spec:
        item = str(item)
        if is_local(item) and _local_path(item).is_dir():
            folder = _local_path(item)
            index = folder / "index.json"
            if index.is_file():
                urls += [str(folder / s["name"]) for s in json.loads(index.read_text())["shards"]]
            else:
                urls += [str(p) for p in sorted(folder.glob("*.tar"))]
            if not urls:
                raise FileNotFoundError(f"no shards (*.tar or index.json) in folder {folder}")
            continue
        urls += expand_urls(item)
    if not urls:
        raise ValueError(f"no shards in {spec!r}")
    return urls


def check_shards(urls: Sequence[str]) -> None:
    """Fail before training if a local shard is missing (remote and pipe: URLs are checked when read)."""
    missing = [u for u in urls if is_local(u) and not _local_path(u).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"shard not found: {missing[0]}{more}")


def shard_sample_counts(urls: Sequence[str]) -> list[int] | None:
    """Samples per shard, from the index.json beside local shards or by listing the tars; None if a shard is
    remote."""
    indexes: dict[Path, dict[str, int]] = {}
    counts = []
    for url in urls:
        if not is_local(url):
            return None
        path = _local_path(url)
        if path.parent not in indexes:
            index = path.parent / "index.json"
            shards = json.loads(index.read_text())["shards"] if index.is_file() else []
            indexes[path.parent] = {s["name"]: int(s["num_samples"]) for s in shards}
        if path.name in indexes[path.parent]:
            counts.append(indexes[path.parent][path.name])
            continue
        keys = set()
        try:
            with tarfile.open(path) as tar:
                for name in tar.getnames():
                    prefix, _ = base_plus_ext(name)
                    if prefix:
                        keys.add(prefix)
        except (tarfile.TarError, OSError, EOFError):
            pass
        counts.append(len(keys))
    return counts


def count_samples(urls: Sequence[str]) -> int | None:
    """Total samples of a shard list (see `shard_sample_counts`); None if unknown."""
    counts = shard_sample_counts(urls)
    return None if counts is None else sum(counts)


def epoch_batches(counts: Sequence[int], world: int, workers: int, batch_size: float, weight: float = 1.0) -> int:
    """Default batches per rank per epoch so that no worker outruns its share of a pass (samples disjoint).

    With S = world * workers slots and n >= S shards, the worst-placed slot gets the floor(n / S) smallest
    shards, m samples, and can fill floor(m / batch_size) batches; a rank then yields workers times that,
    divided by the source's share of batches (`weight`). With fewer shards than slots: one pass over the
    ranks, floor(sum(counts) / (world * batch_size * weight)). At least 1.
    """
    slots = world * max(1, workers)
    if len(counts) >= slots:
        share = sum(sorted(counts)[: len(counts) // slots])
        batches = max(1, workers) * math.floor(share / batch_size) / weight
    else:
        batches = sum(counts) / (world * batch_size * weight)
    return max(1, math.floor(batches))


# ----------------------------------------------------------------------------------------------------------------
# reading one shard


class ShardReadError(RuntimeError):
    """A shard could not be opened or its tar stream broke off (truncated or corrupt)."""

    def __init__(self, url: str, key: str | None, detail: str) -> None:
        super().__init__(f"shard {url}: {detail}" + (f" (at sample {key})" if key else ""))
        self.url, self.key, self.detail = url, key, detail


def read_shard(url: str) -> Iterator[dict[str, Any]]:
    """Samples of one tar shard: {"__key__", "__url__", ext: bytes, ...} for consecutive members sharing a key.

    Members whose last extension is not in READ_EXTENSIONS are skipped unread. A broken stream raises
    ShardReadError after the complete samples before the break were yielded (the sample being read is lost).
    """
    current: dict[str, Any] | None = None
    try:
        stream = gopen(url[5:] if url.startswith("file:") else url, "rb")
    except Exception as exc:  # noqa: BLE001 - any opener failure (missing file, bad scheme) is a shard error
        raise ShardReadError(url, None, f"cannot open ({exc})") from exc
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                tar.members = []  # streaming mode keeps every TarInfo otherwise
                if not member.isreg():
                    continue
                prefix, suffix = base_plus_ext(member.name)
                if prefix is None or os.path.basename(prefix).startswith("__"):
                    continue
                suffix = suffix.lower()
                if current is None or current["__key__"] != prefix:
                    if current is not None:
                        yield current
                    current = {"__key__": prefix, "__url__": url}
                if suffix.rsplit(".", 1)[-1] in READ_EXTENSIONS:
                    handle = tar.extractfile(member)
                    current[suffix] = handle.read() if handle is not None else b""
        if current is not None:
            yield current
    except (tarfile.TarError, OSError, EOFError, zlib.error, ValueError) as exc:
        raise ShardReadError(url, current["__key__"] if current else None, f"truncated or corrupt tar ({exc})") from exc
    finally:
        try:
            stream.close()
        except Exception:  # noqa: BLE001 - a pipe that exited non-zero; the read error (if any) is reported
            pass


# ----------------------------------------------------------------------------------------------------------------
# seeds and schedules


def mix_seed(*parts: Any) -> int:
    """A 64-bit seed from any tuple of ints/strings: blake2b(repr(parts))."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def shard_schedule(
    num_shards: int, seed: int, epoch: int, slot: int, num_slots: int, shuffle: bool
) -> Iterator[tuple[int, int]]:
    """Endless (pass, shard index) for one slot: positions slot, slot + S, ... of P_0 P_1 ... (see module doc)."""
    position = slot
    cached: tuple[int, list[int]] = (-1, [])
    while True:
        pass_index, offset = divmod(position, num_shards)
        if cached[0] != pass_index:
            order = list(range(num_shards))
            if shuffle:
                random.Random(mix_seed(seed, epoch, pass_index, "shards")).shuffle(order)
            cached = (pass_index, order)
        yield pass_index, cached[1][offset]
        position += num_slots


# ----------------------------------------------------------------------------------------------------------------
# handlers, buckets, sources


class SkipSample(Exception):
    """Raised by a handler to skip a sample; `reason` is counted (see FILTER_REASONS for non-bad ones)."""

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


class BadDataError(RuntimeError):
    """Too many bad samples (or none usable); the message names the shard and key of the last bad sample."""


# ----------------------------------------------------------------------------------------------------------------
# worker side


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
        for pass_index, shard in schedule:
            if pass_index != current_pass:
                while buffer:
                    yield emit(pop())
                current_pass = pass_index
            got = 0
            try:
                for sample in read_shard(urls[shard]):
                    got += 1
                    if size <= 1:
                        yield emit(sample)
                        continue
                    buffer.append(sample)
                    if len(buffer) >= size:
                        yield emit(pop())
            except ShardReadError as exc:
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
        self.plan = Plan()

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

        def record(source: int, ordinal: int | None, url: str, key: str | None, reason: str, detail: str) -> None:
            counts[f"skipped/{reason}"] += 1
            counts["filtered" if reason in FILTER_REASONS else "bad"] += 1
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
                        counts["seen"] += 1
                        record(s, None, error.url, error.key, "bad_shard", error.detail)
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
            batch[_STREAM] = {"slot": logical, "index": index, "events": events, "counts": dict(counts),
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


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------------------------
# main-process loaders


def dist_info() -> tuple[int, int]:
    """(rank, world size) from torch.distributed if initialised, else RANK / WORLD_SIZE (default 0 / 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class ShardLoader:
    """Yields `batches_per_epoch` batches per iteration (per rank), decoding in `num_workers` processes.

    Every `iter()` is one epoch: epoch e reads the stream seeded by (seed, e). With `fixed_epoch` set (for
    validation) every iteration replays that epoch. `metrics()` returns the skip counters (see module doc).
    """

    def __init__(
        self,
        dataset: StreamDataset,
        batches_per_epoch: int,
        num_workers: int = 2,
        prefetch_factor: int = 2,
        pin_memory: bool = False,
        fixed_epoch: int | None = None,
        multiprocessing_context: str | None = None,
    ) -> None:
        if batches_per_epoch < 1:
            raise ValueError(f"batches_per_epoch must be >= 1, got {batches_per_epoch}")
        self.dataset = dataset
        self.batches_per_epoch = int(batches_per_epoch)
        self.num_workers = int(num_workers)
        self.prefetch_factor = prefetch_factor
        self.pin_memory = pin_memory
        self.fixed_epoch = fixed_epoch
        self.multiprocessing_context = multiprocessing_context
        self.epoch = -1
        self.counts: Counter = Counter()
        self.last_event: dict | None = None

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _start(self) -> tuple[int, int, Plan]:
        """(epoch, first batch position, worker plan) of the next iteration."""
        self.epoch = self.fixed_epoch if self.fixed_epoch is not None else self.epoch + 1
        rank, world = dist_info()
        return self.epoch, 0, Plan(epoch=self.epoch, rank=rank, world=world)

    def _loader(self, plan: Plan) -> DataLoader:
        dataset = copy.copy(self.dataset)
        dataset.plan = plan
        workers = self.num_workers
        return DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            prefetch_factor=self.prefetch_factor if workers > 0 else None,
            pin_memory=self.pin_memory,
            worker_init_fn=_worker_init if workers > 0 else None,
            multiprocessing_context=self.multiprocessing_context if workers > 0 else None,
        )

    def _account(self, info: dict) -> None:
        """Add a batch's skip counts to the live counters and stop if the bad fraction is exceeded."""
        self.counts.update(info["counts"])
        if info["events"]:
            self.last_event = info["events"][-1]
        limit = self.dataset.max_bad_fraction
        bad, seen = self.counts["bad"], self.counts["seen"]
        if self.last_event and seen >= self.dataset.min_samples and bad / max(1, seen) > limit:
            raise BadDataError(bad_message(bad, seen, limit, self.last_event))

    def _deliver(self, batch: dict, epoch: int, position: int, info: dict) -> dict:
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch, start, plan = self._start()
        loader = self._loader(plan)
        iterator = iter(loader)
        try:
            for position in range(start + 1, self.batches_per_epoch + 1):
                batch = next(iterator)
                info = batch.pop(_STREAM)
                self._account(info)
                finalize = getattr(self.dataset.sources[info["source"]].handler, "finalize", None)
                if finalize is not None:
                    batch = finalize(batch)
                yield self._deliver(batch, epoch, position, info)
        finally:
            shutdown = getattr(iterator, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            del iterator

    def metrics(self) -> dict[str, float]:
        """data/seen, data/bad, data/filtered, data/skipped, data/bad_fraction and data/skipped/<reason>."""
        c = self.counts
        out = {"data/seen": float(c["seen"]), "data/bad": float(c["bad"]), "data/filtered": float(c["filtered"]),
               "data/skipped": float(c["bad"] + c["filtered"]),
               "data/bad_fraction": c["bad"] / max(1, c["seen"])}
        out.update({f"data/{k}": float(v) for k, v in sorted(c.items()) if k.startswith("skipped/")})
        return out


@dataclass
class _Receipt:
    epoch: int
    position: int
    slot: int
    events: list[dict]
    counts: dict


class ResumableShardLoader(ShardLoader):
    """A ShardLoader with `state_dict` / `load_state_dict`, so Lightning saves its position in checkpoints.

    A batch counts as trained when `commit(receipt)` is called with the receipt it carries under "_receipt"
    (the datamodule does this in `on_before_batch_transfer`); with `commit_on_yield=True` (plain loops) a
    batch counts as soon as it is yielded.
    """

    MAX_PENDING = 64

    def __init__(self, *args: Any, commit_on_yield: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commit_on_yield = commit_on_yield
        self.position = 0  # committed batches of self.epoch
        self.committed: Counter = Counter()
        self.bad: dict[int, set[tuple[int, int]]] = {}
        self._pending: list[_Receipt] = []
        self._resume = False
        self._token = mix_seed(id(self), os.getpid())

    def _start(self) -> tuple[int, int, Plan]:
        rank, world = dist_info()
        workers = max(1, self.num_workers)
        if self._resume and 0 <= self.epoch and self.position < self.batches_per_epoch:
            start = self.position
        else:
            self.epoch, self.position, start, self.bad = self.epoch + 1, 0, 0, {}
        self._resume = False
        self._pending.clear()
        self.counts = Counter(self.committed)
        skip = {w: len(range(w, start, workers)) for w in range(workers)}
        plan = Plan(self.epoch, rank, world, rotation=start % workers, skip=skip,
                    bad={w: set(v) for w, v in self.bad.items()})
        return self.epoch, start, plan

    def _deliver(self, batch: dict, epoch: int, position: int, info: dict) -> dict:
        receipt = _Receipt(epoch, position, info["slot"], info["events"], info["counts"])
        self._pending.append(receipt)
        if self.commit_on_yield or len(self._pending) > self.MAX_PENDING:
            self.commit((self._token, epoch, self._pending[0 if not self.commit_on_yield else -1].position))
        if not self.commit_on_yield:
            batch[RECEIPT] = (self._token, epoch, position)
        return batch

    def commit(self, receipt: tuple[int, int, int]) -> None:
        """Mark every batch up to this receipt's position as trained (ignores receipts of other loaders)."""
        token, epoch, position = receipt
        if token != self._token or epoch != self.epoch:
            return
        while self._pending and self._pending[0].position <= position:
            done = self._pending.pop(0)
            self.committed.update(done.counts)
            for event in done.events:
                if event["ordinal"] is not None:
                    self.bad.setdefault(done.slot, set()).add((event["source"], event["ordinal"]))
            self.position = done.position

    def _local_state(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "batches_per_epoch": self.batches_per_epoch,
            "workers": max(1, self.num_workers),
            "world": dist_info()[1],
            "seed": self.dataset.seed,
            "bad": {str(w): sorted([list(x) for x in v]) for w, v in self.bad.items()},
            "counts": dict(self.committed),
        }

    def state_dict(self) -> dict:
        """{"ranks": [state of rank 0, rank 1, ...]}: epoch, trained batches, known-bad ordinals, counters."""
        state = self._local_state()
        rank, world = dist_info()
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            states: list[Any] = [None] * world
            torch.distributed.all_gather_object(states, state)
            return {"version": 1, "ranks": states}
        return {"version": 1, "ranks": [state]}

    def load_state_dict(self, state_dict: dict) -> None:
        """Resume at the saved epoch and batch position (exact when world size and workers are unchanged)."""
        rank, world = dist_info()
        states = state_dict["ranks"]
        state = states[rank] if rank < len(states) else states[0]
        same = (len(states) == world and state["workers"] == max(1, self.num_workers)
                and state["seed"] == self.dataset.seed and state["batches_per_epoch"] == self.batches_per_epoch)
        if not same:
            warnings.warn(
                f"data stream resumed with a different setup (world {len(states)}->{world}, workers"
                f" {state['workers']}->{max(1, self.num_workers)}, seed {state['seed']}->{self.dataset.seed},"
                f" epoch length {state['batches_per_epoch']}->{self.batches_per_epoch}): same epoch and batch"
                " count, different samples", stacklevel=2)
        self.epoch = int(state["epoch"])
        self.position = min(int(state["position"]), self.batches_per_epoch)
        self.bad = {int(w): {tuple(x) for x in v} for w, v in state["bad"].items()} if same else {}
        self.committed = Counter(state["counts"])
        self.counts = Counter(self.committed)
        self._resume = True
