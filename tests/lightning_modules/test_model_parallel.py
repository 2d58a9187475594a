"""Tensor, sequence and context parallelism (lightning_modules/model_parallel.py) on gloo processes: a tiny DiT
split over 2 or 4 CPU processes computes the loss and every parameter gradient of one process on the same global
batch, to fp32 tolerance; with FSDP over the data-parallel ranks as well."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from lightning_modules.model_parallel import (
    ModelParallel,
    apply_model_parallel,
    broadcast_batch,
    sync_gradients,
)
from lightning_modules.nn.dit import DiT
from lightning_modules.parallel import ParallelConfig, apply_parallelism
from tests.helpers import spawn_gloo

# 4 heads, SwiGLU 64: splits over tp = 2; 2x4x4 patches = 32 tokens: splits over cp·tp = 4.
DIT = dict(in_channels=3, dim=32, depth=2, heads=4, ffn_dim=64, patch=(1, 2, 2), max_t=2, max_h=4, max_w=4,
           qk_norm=True, pooled_text=True)
BATCH = 2  # clips per data-parallel rank


def global_batch(dp: int) -> dict[str, torch.Tensor]:
    """Inputs for dp·BATCH clips, the same on every process."""
    g = torch.Generator().manual_seed(1)
    n = dp * BATCH
    mask = torch.ones(n, 5, dtype=torch.bool)
    mask[0, 3:] = False
    return {"x": torch.randn(n, 3, 2, 8, 8, generator=g), "t": torch.rand(n, generator=g),
            "context": torch.randn(n, 5, 32, generator=g), "mask": mask,
            "target": torch.randn(n, 3, 2, 8, 8, generator=g)}


def build(rope: bool = False) -> DiT:
    torch.manual_seed(0)
    net = DiT(**DIT, rope_theta=100.0 if rope else None)
    with torch.no_grad():  # leave adaLN-Zero's zeros, so that every path carries a gradient
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def loss_of(net: DiT, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = net(batch["x"], batch["t"], batch["context"], batch["mask"])
    return (out - batch["target"]).pow(2).mean()


def _worker(rank: int, world: int, tp: int, cp: int, rope: bool, out: str) -> None:
    parallel = ModelParallel.build("cpu", world, tp=tp, cp=cp)
    dp = world // (tp * cp)
    net = build(rope)
    apply_model_parallel(net, parallel)
    if dp > 1:
        apply_parallelism(net, list(net.blocks), parallel.dp_mesh, ParallelConfig())
    dp_index = parallel.mesh["dp"].get_local_rank()
    whole = global_batch(dp)
    mine = {k: v[dp_index * BATCH:(dp_index + 1) * BATCH] for k, v in whole.items()}
    # a (cp, tp) group trains on its first rank's batch: the others get a wrong one, and must not use it
    if parallel.sequence is not None and dist.get_rank(parallel.sequence) > 0:
        mine = {k: torch.zeros_like(v) for k, v in mine.items()}
    mine = broadcast_batch(mine, parallel)
    loss = loss_of(net, mine)
    loss.backward()
    sync_gradients(parallel)
    grads = {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
             for n, p in net.named_parameters()}
    total = loss.detach().clone()
    dist.all_reduce(total)
    if rank == 0:
        torch.save({"loss": total / world, "grads": grads}, Path(out) / "result.pt")


@pytest.mark.parametrize(("world", "tp", "cp", "rope"), [
    (2, 2, 1, False),   # tensor (and sequence) parallel
    (2, 1, 2, False),   # context parallel
    (2, 1, 2, True),    # context parallel with RoPE: each rank turns its chunk's queries and keys
    pytest.param(4, 2, 1, False, marks=pytest.mark.slow, id="4-fsdp2xtp2"),
    pytest.param(4, 2, 2, True, marks=pytest.mark.slow, id="4-cp2xtp2-rope"),
    pytest.param(4, 1, 2, False, marks=pytest.mark.slow, id="4-fsdp2xcp2"),
])
def test_parallel_loss_and_gradients_equal_one_process(tmp_path: Path, world: int, tp: int, cp: int,
                                                       rope: bool) -> None:
    spawn_gloo(_worker, world, world, tp, cp, rope, str(tmp_path))
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    dp = world // (tp * cp)
    net = build(rope)
    whole = global_batch(dp)
    # FSDP averages the data-parallel ranks' gradients: the mean of their mean losses
    loss = sum(loss_of(net, {k: v[i * BATCH:(i + 1) * BATCH] for k, v in whole.items()}) for i in range(dp)) / dp
    loss.backward()
    torch.testing.assert_close(result["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
    expected = {n: p.grad for n, p in net.named_parameters()}
    assert set(result["grads"]) == set(expected)
    for name, grad in expected.items():
        assert grad.abs().max() > 0, f"{name} has no gradient: the test would not see a missing reduction"
        torch.testing.assert_close(result["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_split_that_does_not_divide_is_named() -> None:
    from lightning_modules.model_parallel import check_divisible

    class Fake:
        heads, ffn_dim = 3, 64

    parallel = type("P", (), {"tp": 2})()
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 must divide the DiT's heads \(3\)"):
        check_divisible(Fake(), parallel)
