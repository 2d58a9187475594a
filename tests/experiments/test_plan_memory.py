"""The planner plans what the code runs: its memory per rank for a small DiT split over 2 gloo processes (tensor
parallel, context parallel) matches the measured peak within 20% (experiments/benchmarks/parallel_memory.py)."""

from __future__ import annotations

import pytest

from experiments.benchmarks.parallel_memory import measure, planned


@pytest.mark.slow
@pytest.mark.parametrize(("tp", "cp"), [(2, 1), (1, 2)])
def test_planned_memory_matches_a_measured_two_process_run(tp: int, cp: int) -> None:
    measured = measure(2, tp, cp, steps=2)
    plan = planned(2, tp, cp)["total"]
    assert 0.8 <= plan / measured <= 1.2, f"planned {plan / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB"
    one = measure(1, 1, 1, steps=2)
    assert measured < 0.8 * one, "the split holds less than one process (the test sees a split that does nothing)"
