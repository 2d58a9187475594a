"""DP with 2 gloo processes: the noise is added once, every rank gets the same update and the same Z."""

from __future__ import annotations

import math
import os

import pytest
import torch
from opacus.grad_sample import GradSampleHooks
from torch import nn

from lightning_modules.privacy.optimizers import DPSGDGlobalAdaptOptimizer
from tests.helpers import spawn_gloo

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook")
SIGMA, N_EXPECTED = 1.5, 20.0


def _worker(rank: int, out_dir: str) -> None:
    torch.manual_seed(100 + rank)  # different local noise streams: only rank 0's may reach the update
    model = nn.Linear(100, 200, bias=False)
    nn.init.zeros_(model.weight)
    hooks = GradSampleHooks(model, loss_reduction="mean")
    opt = DPSGDGlobalAdaptOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=SIGMA, max_grad_norm=1.0,
                                    expected_batch_size=N_EXPECTED, z0=5.0, count_noise_multiplier=2.0, count_denominator="expected",
                                    world_size=2, rank=rank)
    opt.zero_grad()
    model(torch.zeros(6 + rank, 100)).mean().backward()  # zero per-example gradients, uneven local batches
    opt.step()
    hooks.cleanup()
    torch.save({"grad": model.weight.grad.clone(), "weight": model.weight.detach().clone(), "z": opt.z},
               os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_ranks_add_the_noise_once_and_agree(tmp_path):
    spawn_gloo(_worker, 2, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(r0["weight"], r1["weight"]) and r0["z"] == r1["z"]
    # the global noisy sum / n: std sigma * C0 / n (noise drawn on two ranks would give sqrt(2) times that)
    assert r0["grad"].std().item() == pytest.approx(SIGMA / N_EXPECTED, rel=0.04)
    # Z moved by the one noisy count of the global batch: Z = 5 exp(-0.1 + (0 + N(0, 2^2)) / 20)
    assert r0["z"] != 5.0 and abs(math.log(r0["z"] / 5.0) + 0.1) < 6 * 2.0 / N_EXPECTED
