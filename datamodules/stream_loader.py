"""The main-process side of the shard stream: `ShardLoader` (one epoch per `iter()`, a fixed number of batches per
rank, skip counters) and `ResumableShardLoader` (its position in Lightning checkpoints).

Resume guarantee: EXACT sample position, for the same shards, seed, world size and number of workers.
Everything a worker does is a deterministic function of (seed, epoch, slot) and the data; the per-sample
crop/start draws are seeded by (seed, epoch, slot, source, ordinal). `ResumableShardLoader.state_dict()`
stores the epoch, how many batches of it were trained (committed when the batch reaches the model, so
Lightning's one-batch prefetch is not counted) and the ordinals of samples that failed to decode. On
`load_state_dict` each worker fast-forwards its slot: it re-reads its shards and re-runs shuffle and bucket
assignment (json metadata, or a container probe), but skips decoding (known-bad samples are dropped by
ordinal), then yields the very batches the uninterrupted run would have yielded next. The cost is reading (not decoding) the part of the epoch already
trained. With a different world size or worker count the stream resumes at the same epoch and batch count,
with different samples. Under DDP each rank's state is gathered into the checkpoint (a collective inside
`state_dict`, which Lightning calls on every rank).
"""

from __future__ import annotations

import copy
import os
import random
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, default_convert

from datamodules.shard_schedule import dist_info, mix_seed
from datamodules.stream_dataset import STREAM_INFO, BadDataError, Plan, StreamDataset, bad_message

RECEIPT = "_receipt"  # the batch entry the datamodule commits as trained (see `ResumableShardLoader`)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # W decoding workers beside the training process: one thread each
    # The worker's torch seed comes from the loader's seeded generator (see `ShardLoader._loader`); give
    # NumPy and Python's `random` seeds derived from it too, so nothing in a worker depends on the fork's state.
    seed = torch.initial_seed()
    np.random.seed(seed % 2**32)
    random.seed(seed)


def convert_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """The DataLoader's default conversion (numpy arrays -> tensors) of every entry but "meta": the samples' json,
    plain Python that it would walk value by value (a quarter of a quickstart batch's loading time)."""
    return {key: value if key == "meta" else default_convert(value) for key, value in batch.items()}


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
        # The workers' seeds come from (seed, epoch, rank), not from the global generator: creating the
        # iterator then draws nothing from the training stream, and a resumed epoch's workers are seeded as
        # the uninterrupted run's were.
        generator = torch.Generator().manual_seed(mix_seed(self.dataset.seed, plan.epoch, plan.rank, "workers") % 2**63)
        return DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            prefetch_factor=self.prefetch_factor if workers > 0 else None,
            pin_memory=self.pin_memory,
            worker_init_fn=_worker_init if workers > 0 else None,
            multiprocessing_context=self.multiprocessing_context if workers > 0 else None,
            generator=generator,
            collate_fn=convert_batch,
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
                info = batch.pop(STREAM_INFO)
                self._account(info)
                finalize = getattr(self.dataset.sources[info["source"]].handler, "finalize", None)
                if finalize is not None:
                    batch = finalize(batch)
                yield self._deliver(batch, epoch, position, info)
        finally:
            shutdown = getattr(iterator, "_shutdown_workers", None)
            if shutdown is not None:
                try:
                    shutdown()
                except RuntimeError as exc:
                    # A worker told to exit may abort on its way out (a process forked from one with gloo or
                    # codec threads): everything asked of it was delivered, so only other errors matter.
                    if "killed by signal" not in str(exc):
                        raise
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
