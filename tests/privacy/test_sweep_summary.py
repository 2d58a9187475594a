"""The fair-DP sweep summary's arithmetic (experiments/dp_sweep.py) on hand-made run records: the paired gaps and
the learning-rate choice on validation accuracy."""

from __future__ import annotations

import math

import pytest

from experiments.dp_sweep import RunRecord, comparison, learning_rates


def _record(method: str, seed: int, lr: float, acc8: float, acc2: float, val: float, loss8: float = 0.0,
            loss2: float = 0.0) -> RunRecord:
    metrics = {"fair/test/acc/group_8": acc8, "fair/test/acc/group_2": acc2, "test/acc": (acc8 + acc2) / 2,
               "fair/test/loss/group_8": loss8, "fair/test/loss/group_2": loss2, "val/acc": val,
               "privacy/epsilon": 3.0}
    return RunRecord(f"{method}-{seed}-{lr}", method, seed, metrics, lr)


def test_privacy_cost_gap_is_paired_by_seed():
    records = [_record("none", 0, 0.5, 0.9, 1.0, 0.9, 0.1, 0.1), _record("none", 1, 0.5, 0.7, 1.0, 0.9, 0.2, 0.1),
               _record("dpsgd", 0, 5, 0.5, 0.95, 0.8, 0.6, 0.2), _record("dpsgd", 1, 5, 0.6, 1.0, 0.8, 0.4, 0.1)]
    table = comparison(records, 8, 2)
    # seed 0: pi_8 = 0.4, pi_2 = 0.05 -> 35 points; seed 1: pi_8 = 0.1, pi_2 = 0 -> 10 points (paired, not pooled)
    assert table["dpsgd"]["PCG"] == pytest.approx([35.0, 10.0])
    # ERG: |(0.6 - 0.1) - (0.2 - 0.1)| = 0.4 and |(0.4 - 0.2) - (0.1 - 0.1)| = 0.2
    assert table["dpsgd"]["ERG"] == pytest.approx([0.4, 0.2])
    assert "PCG" not in table["none"] and "epsilon" not in table["none"]


def test_learning_rate_is_chosen_by_mean_validation_accuracy():
    records = [_record("dpsgd", 0, 2.0, 0.1, 0.1, val=0.80), _record("dpsgd", 1, 2.0, 0.1, 0.1, val=0.90),
               _record("dpsgd", 0, 5.0, 0.9, 0.9, val=0.95), _record("dpsgd", 1, 5.0, 0.9, 0.9, val=0.70),
               _record("none", 0, 0.5, 0.0, 0.0, val=0.50), _record("none", 0, 1.0, 0.0, 0.0, val=math.nan)]
    text, best = learning_rates(records)
    # means 85.0 (lr 2) vs 82.5 (lr 5): the higher TEST accuracy of lr 5 must not matter; a NaN score never wins
    assert best == {"none": 0.5, "dpsgd": 2.0}
    assert "| DPSGD | – | – | 85.0 ± 7.1 | 82.5 ± 17.7 | 2 |" in text  # columns lr 0.5, 1, 2, 5
