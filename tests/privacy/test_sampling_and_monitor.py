"""Poisson sampling (one process and split over ranks), the unbalanced digits, and the monitor's math."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from callbacks.dp_monitor import cosine, fairness_stats, group_gradient_sums, load_reference, privacy_gaps
from datamodules.digits import DigitsDataModule, TensorDictDataset
from lightning_modules.privacy.sampling import PoissonBatchSampler, poisson_loader


def _dataset(n: int = 500) -> TensorDictDataset:
    return TensorDictDataset(x=torch.randn(n, 3), y=torch.arange(n) % 4, group=torch.arange(n) % 4)


def test_poisson_batches_have_rate_q():
    loader = poisson_loader(DataLoader(_dataset(), batch_size=50), expected_batch_size=50, seed=0)
    assert len(loader) == 10
    sizes = []
    for epoch in range(20):
        loader.sampler.set_epoch(epoch)
        sizes += [len(b["y"]) for b in loader]
    # |B| ~ Binomial(500, 0.1): mean 50, variance 45 (a fixed-size loader would have variance 0)
    assert np.mean(sizes) == pytest.approx(50, abs=2)
    assert np.var(sizes) == pytest.approx(45, rel=0.35)


def test_ranks_split_one_global_poisson_batch():
    dataset = _dataset()
    full = list(PoissonBatchSampler(dataset, 0.1, 5, seed=3))
    shards = [list(PoissonBatchSampler(dataset, 0.1, 5, seed=3, num_replicas=2, rank=r)) for r in (0, 1)]
    for step in range(5):
        assert sorted(shards[0][step] + shards[1][step]) == full[step]
        assert not set(shards[0][step]) & set(shards[1][step])


def test_empty_poisson_batch_keeps_the_structure():
    loader = poisson_loader(DataLoader(_dataset(5), batch_size=1), expected_batch_size=1e-3, seed=0)
    batch = next(iter(loader))
    assert batch["x"].shape == (0, 3) and batch["y"].dtype == torch.long


def test_unbalanced_digits_downsample_training_only():
    balanced, unbalanced = DigitsDataModule(), DigitsDataModule(downsample={8: 0.1})
    balanced.setup()
    unbalanced.setup()
    count = lambda dm, split, k: int((dm.splits[split].columns["y"] == k).sum())
    assert count(unbalanced, "train", 8) < 0.25 * count(balanced, "train", 8)
    assert count(unbalanced, "train", 2) == count(balanced, "train", 2)
    for split in ("val", "test"):
        assert torch.equal(unbalanced.splits[split].columns["y"], balanced.splits[split].columns["y"])
    again = DigitsDataModule(downsample={8: 0.1}, seed=5)  # the run seed does not change the split
    again.setup()
    assert torch.equal(again.splits["train"].columns["x"], unbalanced.splits["train"].columns["x"])
    with pytest.raises(ValueError, match="downsample"):
        DigitsDataModule(downsample={8: 1.5})


def test_direction_error_on_a_constructed_case():
    # group 0: one example with gradient (10, 0), clipped by DP-SGD (C0 = 1) to (1, 0);
    # group 1: one example with gradient (0, 1), unclipped.
    # g_B ~ (10, 1), clipped g_B ~ (1, 1):
    #   DE_0 = cos((1,0), (10,1)) - cos((1,0), (1,1)) = 10/sqrt(101) - 1/sqrt(2)
    #   DE_1 = cos((0,1), (10,1)) - cos((0,1), (1,1)) = 1/sqrt(101) - 1/sqrt(2)
    grads = torch.tensor([[10.0, 0.0], [0.0, 1.0]])
    factors, clipped = torch.tensor([0.1, 1.0]), torch.tensor([True, False])
    stats = fairness_stats(group_gradient_sums(grads, factors, clipped, torch.tensor([0, 1]), num_groups=3))
    assert stats["direction_error_in_batch"][0].item() == pytest.approx(10 / math.sqrt(101) - 1 / math.sqrt(2), abs=1e-6)
    assert stats["direction_error_in_batch"][1].item() == pytest.approx(1 / math.sqrt(101) - 1 / math.sqrt(2), abs=1e-6)
    assert math.isnan(stats["direction_error_in_batch"][2].item())  # group 2 is not in the batch
    assert stats["clip_fraction"][:2].tolist() == [1.0, 0.0]
    assert stats["magnitude_ratio"][:2].tolist() == pytest.approx([0.1, 1.0])
    assert stats["grad_norm"][:2].tolist() == pytest.approx([10.0, 1.0])
    assert stats["batch_magnitude_ratio"].item() == pytest.approx(math.sqrt(2) / math.sqrt(101))


def test_no_direction_error_when_every_example_is_scaled_alike():
    # Global-Adapt with nothing above Z: f_i = C0 / Z for all, so clipped g_B is parallel to g_B
    torch.manual_seed(0)
    grads = torch.randn(32, 50)
    stats = fairness_stats(group_gradient_sums(grads, torch.full((32,), 0.2), torch.zeros(32, dtype=torch.bool),
                                               torch.arange(32) % 4, num_groups=4))
    assert stats["direction_error_in_batch"].abs().max() < 1e-5
    assert stats["magnitude_ratio"].tolist() == pytest.approx([0.2] * 4)
    assert cosine(torch.zeros(3), torch.ones(3)).item() == 0.0


def test_privacy_gaps_by_hand(tmp_path):
    reference = {"acc": {8: 0.9, 2: 0.95}, "loss": {8: 0.3, 2: 0.1}}
    private = {"acc": {8: 0.4, 2: 0.85}, "loss": {8: 1.5, 2: 0.4}}
    gaps = privacy_gaps(private, reference, 8, 2)
    assert gaps["privacy_cost/group_8"] == pytest.approx(0.5) and gaps["privacy_cost/group_2"] == pytest.approx(0.1)
    assert gaps["privacy_cost_gap"] == pytest.approx(0.4)
    assert gaps["excessive_risk_gap"] == pytest.approx(1.2 - 0.3)
    path = tmp_path / "test_metrics.json"
    path.write_text(json.dumps({kind: {str(k): v for k, v in table.items()} for kind, table in reference.items()}))
    assert load_reference(str(path)) == reference
    with pytest.raises(ValueError, match="group"):
        privacy_gaps({"acc": {8: 0.4}, "loss": {8: 1.0}}, reference, 8, 2)


def test_reference_from_an_mlflow_run(tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.create_run(client.create_experiment("ref", artifact_location=(tmp_path / "art").as_uri()))
    for key, value in {"fair/test/acc/group_8": 0.9, "fair/test/acc/group_2": 0.95,
                       "fair/test/loss/group_8": 0.3, "fair/test/loss/group_2": 0.1, "test/acc": 0.9}.items():
        client.log_metric(run.info.run_id, key, value)
    assert load_reference(run.info.run_id, client) == {"acc": {8: 0.9, 2: 0.95}, "loss": {8: 0.3, 2: 0.1}}
    empty = client.create_run(run.info.experiment_id)
    with pytest.raises(ValueError, match="no fair/test/acc"):
        load_reference(empty.info.run_id, client)


def test_sizes_at_the_edges():
    from lightning_modules.privacy.sampling import is_poisson_loader, steps_per_epoch

    assert steps_per_epoch(100, 30.0) == 3 and steps_per_epoch(10, 100.0) == 1 and steps_per_epoch(1, 0.5) == 2
    for n, b in [(100, 0.0), (0, 5.0), (100, -1.0)]:
        with pytest.raises(ValueError, match="must be positive"):
            steps_per_epoch(n, b)
    full = poisson_loader(DataLoader(_dataset(8), batch_size=2), expected_batch_size=8, seed=0)  # q = 1 is allowed
    assert is_poisson_loader(full) and sum(len(b["y"]) for b in full) == 8 * len(full)  # every example, every batch
    with pytest.raises(ValueError, match="exceeds the training set"):
        poisson_loader(DataLoader(_dataset(8), batch_size=2), expected_batch_size=9, seed=0)
    assert not is_poisson_loader(DataLoader(_dataset(8), batch_size=2))
    assert not is_poisson_loader(object())


def test_a_resumed_sampler_draws_the_masks_an_uninterrupted_one_draws():
    from lightning_modules.privacy.sampling import PoissonBatchSampler

    def epochs(sampler: PoissonBatchSampler, first: int, count: int) -> list[list[int]]:
        out = []
        for epoch in range(first, first + count):
            sampler.set_epoch(epoch)
            out += list(sampler)
        return out

    data = _dataset(200)
    reference = epochs(PoissonBatchSampler(data, sample_rate=0.1, num_steps=6, seed=3), 0, 3)
    assert reference[0] != reference[6]  # epochs draw different masks
    for step in (4, 6, 9):  # mid-epoch 0, the start of epoch 1, mid-epoch 1
        resumed = PoissonBatchSampler(data, sample_rate=0.1, num_steps=6, seed=3)
        resumed.resume_at(step)
        assert epochs(resumed, step // 6, 3 - step // 6) == reference[step:]


@pytest.mark.parametrize("rate", [0.0, 1.5])
def test_a_sample_rate_outside_zero_one_is_refused(rate):
    from lightning_modules.privacy.sampling import PoissonBatchSampler

    with pytest.raises(ValueError, match="sample rate must be in"):
        PoissonBatchSampler(_dataset(10), sample_rate=rate, num_steps=2)
    assert len(list(PoissonBatchSampler(_dataset(10), sample_rate=1.0, num_steps=2))[0]) == 10
