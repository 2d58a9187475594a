"""scikit-learn's bundled handwritten digits (1,797 real 8x8 images, 10 classes; no download).

The train/val/test split is stratified and fixed by `split_seed`, whatever the run's seed. `downsample`
({class: keep probability}) thins classes in the TRAINING split only (each training example of the class is
kept with that probability, drawn with `split_seed`): e.g. {8: 0.09} makes 8 a minority as in the unbalanced
MNIST of the fair-DP experiments, while validation and test stay balanced. Pixels are scaled
from 0..16 to [-1, 1]. Batches are dicts: "x" float32 [B, 1, 8, 8], "y" int64 [B], "group" int64 [B] (the
class label: the group that fairness metrics compare).

Resume: the training order of each epoch is a function of (seed, epoch) alone, and the datamodule saves how
many batches of the current epoch were trained, so a run restored from a mid-epoch checkpoint continues at
the exact next sample (see `ResumableSampler`).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class TensorDictDataset(Dataset):
    """Rows of equally long tensors, returned as dicts."""

    def __init__(self, **columns: torch.Tensor) -> None:
        lengths = {len(c) for c in columns.values()}
        if len(lengths) != 1:
            raise ValueError(f"columns differ in length: { {k: len(c) for k, c in columns.items()} }")
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: c[i] for k, c in self.columns.items()}


class ResumableSampler(DistributedSampler):
    """DistributedSampler (seeded by seed and epoch, one shard per rank) that can start mid-epoch.

    `skip(epoch, n)` drops the first `n` indices of `epoch` once; every other epoch is untouched.
    """

    def __init__(self, dataset: Dataset, seed: int, shuffle: bool = True, drop_last: bool = False) -> None:
        world = torch.distributed.is_available() and torch.distributed.is_initialized()
        super().__init__(
            dataset,
            num_replicas=torch.distributed.get_world_size() if world else 1,
            rank=torch.distributed.get_rank() if world else 0,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
        )
        self._skip: tuple[int, int] | None = None

    def skip(self, epoch: int, n: int) -> None:
        self._skip = (epoch, n)

    def __iter__(self):
        indices = list(super().__iter__())
        if self._skip is not None and self._skip[0] == self.epoch:
            indices = indices[self._skip[1] :]
            self._skip = None
        return iter(indices)


class DigitsDataModule(L.LightningDataModule):
    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        split_seed: int = 0,
        seed: int = 0,
        num_workers: int = 0,
        downsample: dict[int, float] | None = None,
    ) -> None:
        super().__init__()
        for label, keep in (downsample or {}).items():
            if int(label) not in range(10) or not 0 <= keep <= 1:
                raise ValueError(f"data.downsample={downsample}: keys are classes 0..9, values keep probabilities in [0, 1]")
        if not 0 < val_fraction < 1 or not 0 < test_fraction < 1 or val_fraction + test_fraction >= 1:
            raise ValueError(f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} must be in (0, 1) with a sum below 1")
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.seed = seed
        self.num_workers = num_workers
        self.downsample = {int(k): float(v) for k, v in (downsample or {}).items()}
        self.splits: dict[str, TensorDictDataset] = {}
        self._train_sampler: ResumableSampler | None = None
        self._resume_at: tuple[int, int] | None = None

    # -- data --------------------------------------------------------------------------------------------------
    def split_indices(self) -> dict[str, np.ndarray]:
        """Stratified train/val/test indices into the 1,797 digits, fixed by `split_seed`."""
        labels = load_digits().target
        all_idx = np.arange(len(labels))
        train_val, test = train_test_split(
            all_idx, test_size=self.test_fraction, stratify=labels, random_state=self.split_seed
        )
        train, val = train_test_split(
            train_val,
            test_size=self.val_fraction / (1 - self.test_fraction),
            stratify=labels[train_val],
            random_state=self.split_seed,
        )
        train = np.sort(train)
        if self.downsample:
            keep_prob = np.ones(len(train))
            for label, keep in self.downsample.items():
                keep_prob[labels[train] == label] = keep
            train = train[np.random.default_rng(self.split_seed).random(len(train)) < keep_prob]
        return {"train": train, "val": np.sort(val), "test": np.sort(test)}

    def make_split(self, indices: np.ndarray) -> TensorDictDataset:
        digits = load_digits()
        x = torch.from_numpy(digits.images[indices]).float().div(8.0).sub(1.0).unsqueeze(1)
        y = torch.from_numpy(digits.target[indices]).long()
        return TensorDictDataset(x=x, y=y, group=y.clone())

    def setup(self, stage: str | None = None) -> None:
        if not self.splits:
            self.splits = {name: self.make_split(idx) for name, idx in self.split_indices().items()}

    # -- loaders -----------------------------------------------------------------------------------------------
    def _loader(self, split: str, sampler: ResumableSampler) -> DataLoader:
        return DataLoader(
            self.splits[split],
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        self._train_sampler = ResumableSampler(self.splits["train"], seed=self.seed, shuffle=True)
        if self._resume_at is not None:
            epoch, batches = self._resume_at
            self._train_sampler.skip(epoch, batches * self.batch_size)
            self._resume_at = None
        return self._loader("train", self._train_sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", ResumableSampler(self.splits["val"], seed=self.seed, shuffle=False))

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", ResumableSampler(self.splits["test"], seed=self.seed, shuffle=False))

    # -- resume ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The epoch and how many of its batches were trained when the checkpoint was written."""
        if self.trainer is None:
            return {}
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
        return {"epoch": self.trainer.current_epoch, "batches_done": progress.processed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self._resume_at = (state["epoch"], state["batches_done"])
