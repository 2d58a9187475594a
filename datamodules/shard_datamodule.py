"""`ShardDataModule`: the LightningDataModule base of the media datamodules (video, audio+video, image, audio).

It turns shard specs (`datamodules.shards`) into the shard stream's loaders (`datamodules.stream_loader`):
  - `shards=None` uses the synthetic shapes world under `data_dir` (generated on first use in
    `prepare_data`, i.e. once per node before training) and its `world_kind` shard sets (train / val);
  - otherwise `shards` / `val_shards` are anything `expand_shards` takes (paths, brace lists, folders,
    pipe: and http URLs). Missing local shards fail in `setup`, before training, naming the shard.
  - epoch length: `epoch_batches` per rank, else the longest epoch in which no worker outruns its share of
    a pass of any source (`datamodules.shard_schedule.epoch_batches`), so samples are disjoint within an epoch.
  - the training loader is a `ResumableShardLoader` (its state goes into Lightning checkpoints); batches are
    committed as trained in `on_before_batch_transfer`, which also logs the skip counters (data/...) to the
    trainer's loggers every `log_every_n_steps` steps; after fit (`teardown`) the final counters are logged and
    one line says how many training samples were skipped, by reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

from datamodules.shard_schedule import dist_info, epoch_batches
from datamodules.shards import check_shards, expand_shards, shard_sample_counts
from datamodules.sources import Source
from datamodules.stream_dataset import StreamDataset
from datamodules.stream_loader import RECEIPT, ResumableShardLoader, ShardLoader
from datamodules.write_shards import ensure_world


def plain(value: Any) -> Any:
    """Hydra/OmegaConf containers -> plain dicts and lists (recursively)."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return [plain(v) for v in value]
    return value


class ShardDataModule(L.LightningDataModule):
    """Common streaming options; subclasses define `sources(train)` and `world_kind`.

    Args:
        shards: training shards (None: the synthetic world's `world_kind`/train set).
        val_shards: validation shards (None with `shards=None`: the world's val set; else no validation; "world":
            the world's val set whatever `shards` is).
        batch_size: batch size of the largest bucket (smaller buckets get more, see `scale_batch_size`).
        batch_sizes: explicit batch size per bucket name, e.g. {"64x64x8": 12}.
        val_batch_size: batch size of the validation and test stream's largest bucket (None: `batch_size`); when
            set, `batch_sizes` applies to training only. A held-out set scored in whole batches can then keep its
            size whatever the training batch is.
        num_workers: decoding processes per rank (0 decodes in the main process).
        seed: stream seed (None: PL_GLOBAL_SEED, set by `seed_everything`, else 0).
        epoch_batches / val_batches: batches per rank per epoch (None: one pass, see module doc).
        shuffle_buffer: samples in each worker's shuffle buffer.
        max_bad_fraction / min_samples: stop with BadDataError once min_samples were seen and the bad
            fraction exceeds max_bad_fraction.
        data_dir: where the synthetic world lives (`${paths.data_dir}`); world: WorldConfig overrides.
        world_kind: which world shard set to read (scenes, images, identities, edits, stickers).
        require_text: skip (and count) samples without a caption.
        log_every_n_steps: how often data/ metrics go to the loggers (None: the trainer's setting).
        shard_cache_mb: keep up to this many MB of read shards in memory (`shards.ShardCache`; 0: off), in the
            process that reads them: with `num_workers: 0` a small world is read from disk once, not every epoch.
    """

    world_kind = "scenes"

    def __init__(
        self,
        shards: Any = None,
        val_shards: Any = None,
        batch_size: int = 8,
        batch_sizes: dict[str, int] | None = None,
        val_batch_size: int | None = None,
        scale_batch_size: bool = True,
        max_batch_size: int | None = None,
        num_workers: int = 2,
        seed: int | None = None,
        epoch_batches: int | None = None,
        val_batches: int | None = None,
        shuffle_buffer: int = 256,
        max_bad_fraction: float = 0.05,
        min_samples: int = 64,
        prefetch_factor: int = 2,
        pin_memory: bool = False,
        data_dir: str | Path = "data",
        world: dict | None = None,
        world_kind: str | None = None,
        require_text: bool = True,
        log_every_n_steps: int | None = None,
        shard_cache_mb: float = 0.0,
    ) -> None:
        super().__init__()
        for name, value in (("shards", shards), ("val_shards", val_shards)):
            if value == "???":  # a mandatory Hydra value left unset (e.g. conf/data/shards_video.yaml)
                raise ValueError(f"data.{name} is required: set data.{name}=<folder, brace list or URL>")
        self.shards, self.val_shards = plain(shards), plain(val_shards)
        self.batch_size, self.batch_sizes = int(batch_size), plain(batch_sizes) or {}
        self.val_batch_size = None if val_batch_size is None else int(val_batch_size)
        self.scale_batch_size, self.max_batch_size = scale_batch_size, max_batch_size
        self.num_workers, self.seed = int(num_workers), seed
        self.epoch_batches, self.val_batches = epoch_batches, val_batches
        self.shuffle_buffer, self.prefetch_factor, self.pin_memory = shuffle_buffer, prefetch_factor, pin_memory
        self.max_bad_fraction, self.min_samples = max_bad_fraction, min_samples
        self.data_dir, self.world = Path(data_dir), plain(world) or {}
        self.world_kind = world_kind or self.world_kind
        self.require_text, self.log_every_n_steps = require_text, log_every_n_steps
        self.shard_cache_mb = float(shard_cache_mb)
        self.urls: dict[str, list[str] | None] = {}
        self._train_loader: ResumableShardLoader | None = None
        self._val_loader: ShardLoader | None = None

    # ------------------------------------------------------------------------------------------------ shards

    def world_root(self) -> Path:
        """The synthetic world's folder (generated if absent, by as many processes as the run has threads: the
        clips are independent, and nothing else runs yet)."""
        return ensure_world(self.data_dir, self.world, workers=torch.get_num_threads())

    def world_split(self, kind: str, split: str) -> list[str]:
        return expand_shards(self.world_root() / kind / split)

    def prepare_data(self) -> None:
        if self.shards is None:
            self.world_root()

    def resolve(self, spec: Any, kind: str, split: str) -> list[str] | None:
        """Shard URLs of a spec, or of the world's (kind, split) when the spec is "world" or the training shards
        default to it (so `shards: <folder>, val_shards: world` validates on the world's held-out clips)."""
        if spec == "world":
            return self.world_split(kind, split)
        if spec is not None:
            return expand_shards(spec)
        return self.world_split(kind, split) if self.shards is None else None

    def setup(self, stage: str | None = None) -> None:
        if self.urls:
            return
        self.urls = {"train": self.resolve(self.shards, self.world_kind, "train"),
                     "val": self.resolve(self.val_shards, self.world_kind, "val")}
        self.urls.update(self.extra_urls())
        for urls in self.urls.values():
            if urls:
                check_shards(urls)

    def extra_urls(self) -> dict[str, list[str] | None]:
        """More shard lists a subclass needs (e.g. images to mix in); checked like the others."""
        return {}

    # ----------------------------------------------------------------------------------------------- loaders

    def batching(self, train: bool) -> tuple[int, dict[str, int]]:
        """(batch size of the largest bucket, explicit sizes per bucket) of the training or validation stream."""
        if train or self.val_batch_size is None:
            return self.batch_size, self.batch_sizes
        return self.val_batch_size, {}

    def sources(self, train: bool) -> list[Source]:
        """The sources (shards + handler + weight) of the training or validation stream (subclasses)."""
        raise TypeError(f"{type(self).__name__} must define sources(train)")

    def _seed(self) -> int:
        import os

        return int(self.seed if self.seed is not None else os.environ.get("PL_GLOBAL_SEED", 0))

    def _world_size(self) -> int:
        trainer = self.trainer
        return trainer.world_size if trainer is not None else dist_info()[1]

    def _epoch_length(self, sources: list[Source], given: int | None, what: str) -> tuple[int, int | None]:
        """(batches per rank per epoch, total samples or None); see `datamodules.shard_schedule.epoch_batches`."""
        counts = [shard_sample_counts(s.shards) for s in sources]
        known = None if any(c is None for c in counts) else sum(sum(c) for c in counts)
        if given:
            return int(given), known
        if known is None:
            raise ValueError(f"data.{what} is required: the sample count of remote shards without an "
                             f"index.json is unknown ({sources[0].shards[0]})")
        total = sum(s.weight for s in sources)
        lengths = [epoch_batches(c, self._world_size(), self.num_workers, _mean_batch(s), s.weight / total)
                   for s, c in zip(sources, counts) if s.weight > 0]
        return min(lengths), known

    def _dataset(self, sources: list[Source], train: bool, samples: int | None) -> StreamDataset:
        return StreamDataset(sources, seed=self._seed(), shuffle=train, shuffle_buffer=self.shuffle_buffer,
                             max_bad_fraction=self.max_bad_fraction, min_samples=self.min_samples,
                             samples_hint=samples, shard_cache_mb=self.shard_cache_mb)

    def train_dataloader(self) -> ResumableShardLoader:
        if self._train_loader is None:
            self.setup("fit")
            sources = self.sources(train=True)
            length, samples = self._epoch_length(sources, self.epoch_batches, "epoch_batches")
            self._train_loader = ResumableShardLoader(
                self._dataset(sources, True, samples), length, num_workers=self.num_workers,
                prefetch_factor=self.prefetch_factor, pin_memory=self.pin_memory,
                commit_on_yield=self.trainer is None)
        return self._train_loader

    def val_dataloader(self) -> ShardLoader | list:
        self.setup("validate")
        if not self.urls.get("val"):
            return []
        if self._val_loader is None:
            sources = self.sources(train=False)
            length, samples = self._epoch_length(sources, self.val_batches, "val_batches")
            self._val_loader = ShardLoader(self._dataset(sources, False, samples), length,
                                           num_workers=self.num_workers, prefetch_factor=self.prefetch_factor,
                                           pin_memory=self.pin_memory, fixed_epoch=0)
        return self._val_loader

    def test_dataloader(self) -> ShardLoader | list:
        return self.val_dataloader()

    # ----------------------------------------------------------------------------------------------- hooks

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Commit the batch as trained (resume position) and log the data/ counters now and then."""
        if isinstance(batch, dict) and RECEIPT in batch:
            receipt = batch.pop(RECEIPT)
            if self._train_loader is not None:
                self._train_loader.commit(receipt)
            trainer = self.trainer
            every = self.log_every_n_steps or (trainer.log_every_n_steps if trainer is not None else 0)
            if trainer is not None and every and trainer.global_step % every == 0:
                for logger in trainer.loggers:
                    logger.log_metrics(self.metrics(), step=trainer.global_step)
        return batch

    def metrics(self) -> dict[str, float]:
        """The training stream's skip counters (data/seen, data/skipped, ...; see datamodules.stream_dataset)."""
        return self._train_loader.metrics() if self._train_loader is not None else {}

    def teardown(self, stage: str) -> None:
        """After fit: the final data/ counters go to the loggers (the periodic logging misses the last interval)
        and one line to the console, e.g. "data: skipped 14 of 56 training samples: 8 no caption, 6 undecodable"."""
        trainer = self.trainer
        if stage != "fit" or self._train_loader is None or trainer is None:
            return
        metrics = self.metrics()
        if not metrics:
            return
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if trainer.is_global_zero:
            print(skip_summary(metrics), flush=True)


def skip_summary(metrics: dict[str, float]) -> str:
    """One line from the data/ counters: how many training samples were skipped of how many, by reason."""
    seen, skipped = int(metrics.get("data/seen", 0)), int(metrics.get("data/skipped", 0))
    if not skipped:
        return f"data: {seen} training samples read, none skipped"
    reasons = sorted(((int(v), k[len("data/skipped/"):]) for k, v in metrics.items()
                      if k.startswith("data/skipped/") and v), reverse=True)
    where = "; bad_shard counts the samples lost in broken tars" if any(r == "bad_shard" for _, r in reasons) else ""
    return (f"data: skipped {skipped} of {seen} training samples: "
            + ", ".join(f"{n} {reason.replace('_', ' ')}" for n, reason in reasons) + where)


def _mean_batch(source: Source) -> float:
    handler = source.handler
    buckets = getattr(handler, "table", None)
    sizes = [b.batch_size for b in (buckets.buckets.values() if buckets else getattr(handler, "buckets", {}).values())]
    return sum(sizes) / len(sizes) if sizes else 1.0
