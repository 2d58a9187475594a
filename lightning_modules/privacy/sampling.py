"""Poisson sampling, the batch distribution the accountants assume, for one process or several (DDP).

Each step draws mask_i ~ Bernoulli(q) independently for every example i of the WHOLE dataset, with a generator
seeded by (seed, epoch, resume step) identically on every rank, so all ranks agree on the global batch B = {i : mask_i}:
B is exactly a Poisson sample of rate q. Rank r trains on B[r::world_size]; the sum over ranks of the local
clipped sums is the global clipped sum. Empty (local or global) batches are yielded as batches of length 0,
so every rank takes the same number of steps and an empty step is still a noisy, accounted release (the
module's loss must tolerate an empty batch; a rank's batch is empty with probability about exp(-its expected size)).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset


def steps_per_epoch(num_examples: int, expected_batch_size: float) -> int:
    """Poisson steps per epoch: round(1 / q) = round(N / expected batch size), at least 1."""
    if expected_batch_size <= 0 or num_examples <= 0:
        raise ValueError(f"expected batch size ({expected_batch_size}) and dataset size ({num_examples}) must be positive")
    return max(1, round(num_examples / expected_batch_size))


class PoissonBatchSampler(DistributedSampler):
    """Yields this rank's share of one Poisson batch per step (a list of dataset indices).

    It is a DistributedSampler (each rank gets its own part of the data) so Lightning does not replace it;
    `set_epoch` (called by Lightning every epoch) changes the masks. The masks of step i of epoch e are a
    function of (seed, e, i): `resume_at(global_step)` makes a resumed run's epoch skip the steps it already
    took, so the run goes on with exactly the masks an uninterrupted run would have drawn.
    """

    def __init__(
        self,
        dataset: Dataset,
        sample_rate: float,
        num_steps: int,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, seed=seed)
        if not 0 < sample_rate <= 1:
            raise ValueError(f"Poisson sample rate must be in (0, 1], got {sample_rate}")
        self.dataset_size = len(dataset)  # type: ignore[arg-type]
        self.sample_rate = sample_rate
        self.num_steps = num_steps
        self._resume: tuple[int, int] | None = None

    def resume_at(self, global_step: int) -> None:
        """A resumed run continues at `global_step`: the epoch it falls in (every epoch is `num_steps` steps)
        skips the steps already taken, so the masks after a resume are those an uninterrupted run draws."""
        self._resume = divmod(int(global_step), self.num_steps)

    def __iter__(self) -> Iterator[list[int]]:
        start = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            start, self._resume = self._resume[1], None
        generator = torch.Generator().manual_seed(hash((self.seed, self.epoch, 0)) % 2**63)
        for step in range(self.num_steps):
            mask = torch.rand(self.dataset_size, generator=generator) < self.sample_rate
            if step < start:  # taken before the resume: drawn only to keep the generator in step
                continue
            indices = mask.nonzero().flatten()
            yield indices[self.rank :: self.num_replicas].tolist()

    def __len__(self) -> int:
        return self.num_steps


class IndexListDataset(Dataset):
    """dataset[list of indices] -> list of examples (the DataLoader then collates the list)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, indices: Sequence[int]) -> list[Any]:
        return [self.dataset[i] for i in indices]


def _empty_like(batch: Any) -> Any:
    """The same structure with batch dimension 0 (tensors) or no entries (lists)."""
    if isinstance(batch, torch.Tensor):
        return batch.new_empty((0, *batch.shape[1:]))
    if isinstance(batch, Mapping):
        return {k: _empty_like(v) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(_empty_like(v) for v in batch)
    if isinstance(batch, list):
        return []
    raise TypeError(f"cannot make an empty Poisson batch of a {type(batch).__name__}; use tensors, dicts, lists")


class _EmptySafeCollate:
    """collate(examples), or an empty batch of the dataset's structure when no example was drawn."""

    def __init__(self, collate: Callable[[list[Any]], Any], first_example: Any) -> None:
        self.collate = collate
        self.empty = _empty_like(collate([first_example]))

    def __call__(self, examples: list[Any]) -> Any:
        return self.collate(examples) if examples else self.empty


def poisson_loader(
    loader: DataLoader, expected_batch_size: float, seed: int, num_replicas: int = 1, rank: int = 0
) -> DataLoader:
    """A loader over `loader`'s dataset that draws Poisson batches of rate q = expected_batch_size / N.

    `expected_batch_size` is the GLOBAL expected batch (summed over ranks). Workers, collate function and
    pinning are taken from `loader`; its sampler and batch size are not used.
    """
    dataset = loader.dataset
    if isinstance(dataset, IterableDataset):
        raise ValueError(
            "DP training needs Poisson sampling, which needs a map-style dataset (random access); the training "
            f"loader's dataset is an IterableDataset ({type(dataset).__name__})"
        )
    num_examples = len(dataset)  # type: ignore[arg-type]
    sample_rate = expected_batch_size / num_examples
    if sample_rate > 1:
        raise ValueError(f"expected batch size {expected_batch_size} exceeds the training set ({num_examples} examples)")
    sampler = PoissonBatchSampler(dataset, sample_rate, steps_per_epoch(num_examples, expected_batch_size), seed,
                                  num_replicas, rank)
    return DataLoader(
        IndexListDataset(dataset),
        sampler=sampler,
        batch_size=None,
        collate_fn=_EmptySafeCollate(loader.collate_fn, dataset[0]),
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
        worker_init_fn=loader.worker_init_fn,
        persistent_workers=loader.persistent_workers,
    )


def is_poisson_loader(loader: Any) -> bool:
    return isinstance(loader, DataLoader) and isinstance(loader.sampler, PoissonBatchSampler)
