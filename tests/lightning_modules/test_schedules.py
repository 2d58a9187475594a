"""Learning-rate schedules: any length >= 1 works, torch's numbers where torch works, and a checkpoint restores a
schedule's progress but not its length (a finished run extended with a larger budget rebuilds its schedule)."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch.optim.lr_scheduler import OneCycleLR

from lightning_modules.schedules import Cosine, OneCycle, fill_length


def adamw() -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=2e-3, betas=(0.9, 0.99))


def run(scheduler, steps: int) -> list[float]:
    lrs = []
    for _ in range(steps):
        lrs.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("total", [1, 2, 3, 19, 20, 21])
def test_one_cycle_runs_any_length(total: int) -> None:
    lrs = run(OneCycle(adamw(), max_lr=2e-3, total_steps=total, pct_start=0.05), total + 3)  # and past the end
    assert all(math.isfinite(lr) and 0 < lr <= 2e-3 for lr in lrs)
    assert lrs[-1] == lrs[total]  # past the end: the final rate


@pytest.mark.parametrize("total", [2, 3, 19, 21, 1500])
def test_one_cycle_is_torch_one_cycle_where_torch_works(total: int) -> None:
    ours, theirs = adamw(), adamw()
    a = OneCycle(ours, max_lr=2e-3, total_steps=total, pct_start=0.05)
    b = OneCycleLR(theirs, max_lr=2e-3, total_steps=total, pct_start=0.05)
    for _ in range(total - 1):
        assert a.get_last_lr() == b.get_last_lr()
        assert ours.param_groups[0]["betas"] == theirs.param_groups[0]["betas"]
        ours.step(), theirs.step(), a.step(), b.step()
    assert a.get_last_lr() == b.get_last_lr()  # the last step's rate (torch's final value) too


def test_a_checkpoint_restores_progress_not_length() -> None:
    finished = OneCycle(adamw(), max_lr=2e-3, total_steps=60, pct_start=0.05)
    run(finished, 60)
    extended = OneCycle(adamw(), max_lr=2e-3, total_steps=90, pct_start=0.05)
    extended.load_state_dict(finished.state_dict())
    assert extended.total_steps == 90 and extended.last_epoch == 60
    lrs = run(extended, 30)  # OneCycleLR raised "Tried to step 61 times" here
    fresh = OneCycle(adamw(), max_lr=2e-3, total_steps=90, pct_start=0.05)
    assert lrs == pytest.approx(run(fresh, 90)[60:])  # the rebuilt schedule, from the first step after the resume
    assert extended.optimizer.param_groups[0]["lr"] == pytest.approx(fresh.optimizer.param_groups[0]["lr"])


@pytest.mark.parametrize("t_max", [1, 2, 20])
def test_cosine_any_length_and_constant_after(t_max: int) -> None:
    lrs = run(Cosine(adamw(), T_max=t_max), t_max + 3)
    assert lrs[0] == pytest.approx(2e-3) and lrs[t_max] == pytest.approx(0.0) and lrs[-1] == pytest.approx(0.0)


def test_an_unset_length_is_named() -> None:
    with pytest.raises(ValueError, match="model.scheduler.total_steps=-1"):
        OneCycle(adamw(), max_lr=2e-3, total_steps=-1)


def test_a_resume_of_the_same_length_changes_nothing(capsys: pytest.CaptureFixture) -> None:
    first = OneCycle(adamw(), max_lr=2e-3, total_steps=60, pct_start=0.05)
    run(first, 30)
    again = OneCycle(adamw(), max_lr=2e-3, total_steps=60, pct_start=0.05)
    again.optimizer.param_groups[0]["lr"] = 1.0  # the optimizer's own restored state is left alone
    again.load_state_dict(first.state_dict())
    assert again.last_epoch == 30 and again.optimizer.param_groups[0]["lr"] == 1.0
    assert "[schedule]" not in capsys.readouterr().out


def test_fill_length_sets_only_an_unset_length() -> None:
    calls = []

    def length() -> int:
        calls.append(1)
        return 40

    for unset in (None, 0, -1):
        filled = fill_length(functools.partial(OneCycle, max_lr=1.0, total_steps=unset), length)
        assert filled.keywords["total_steps"] == 40
    assert fill_length(functools.partial(Cosine, T_max=1), length).keywords["T_max"] == 1
    assert fill_length(functools.partial(torch.optim.lr_scheduler.StepLR, step_size=3), length).keywords == {
        "step_size": 3}
    assert fill_length(Cosine, length) is Cosine and len(calls) == 3


def test_a_zero_length_warm_up_starts_at_the_peak() -> None:
    # 20 steps at 5%: the warm-up ends at step 0.05·20 − 1 = 0, where OneCycleLR divides by zero
    lrs = run(OneCycle(adamw(), max_lr=2e-3, total_steps=20, pct_start=0.05), 2)
    assert lrs[0] == pytest.approx(2e-3) and lrs[1] < lrs[0]


def test_cosine_with_a_floor_is_torch_cosine() -> None:
    ours, theirs = adamw(), adamw()
    a, b = Cosine(ours, T_max=10, eta_min=5e-4), torch.optim.lr_scheduler.CosineAnnealingLR(theirs, T_max=10, eta_min=5e-4)
    for _ in range(10):
        assert a.get_last_lr() == pytest.approx(b.get_last_lr(), rel=1e-9)
        ours.step(), theirs.step(), a.step(), b.step()
    assert a.get_last_lr() == pytest.approx([5e-4])


@pytest.mark.parametrize("t_max", [None, 0])
def test_an_unset_cosine_length_is_named(t_max: int | None) -> None:
    with pytest.raises(ValueError, match=f"model.scheduler.T_max={t_max}"):
        Cosine(adamw(), T_max=t_max)


def test_fill_length_never_sets_a_length_below_one() -> None:
    assert fill_length(functools.partial(OneCycle, max_lr=1.0, total_steps=None), lambda: 0).keywords["total_steps"] == 1
