"""MuonAdamW: which parameters Muon steps, its update against torch's optimizers and against the polar factor,
resume, the schedule driving both halves through `BaseModule.configure_optimizers`, and FSDP2-sharded parameters
on 2 gloo processes against one process."""

from __future__ import annotations

import copy
import functools
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from lightning_modules.base import BaseModule
from lightning_modules.optimizers import Muon, MuonAdamW, newton_schulz, ns_dtype_for
from lightning_modules.schedules import OneCycle
from tests.helpers import spawn_gloo


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.pos = nn.Parameter(torch.randn(4, 8))  # a table: added, not multiplied
        self.hidden = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.out = nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(torch.relu(self.hidden(self.embed(ids) + self.pos))))


def backward(net: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 10, (5, 4), generator=g)
    net.zero_grad()
    (net(ids) - torch.randn(5, 4, 3, generator=g)).square().mean().backward()


def ids(opt: torch.optim.Optimizer, muon: bool) -> set[int]:
    return {id(p) for g in opt.param_groups if g["muon"] == muon for p in g["params"]}


def test_muon_steps_the_linear_weights_only() -> None:
    net = Net()
    opt = MuonAdamW(net.parameters(), module=net, lr=1e-3)
    assert ids(opt, muon=True) == {id(net.hidden.weight), id(net.out.weight)}
    assert ids(opt, muon=False) == {id(p) for p in net.parameters()} - ids(opt, muon=True)  # tables, norm, biases
    assert len(opt.param_groups) == 2


def test_muon_follows_torch_muon() -> None:
    """Our Muon against torch.optim.Muon (match_rms_adamw) over three steps with weight decay: the same update up
    to torch's bfloat16 Newton-Schulz (~1.5% of the change here)."""
    torch.manual_seed(0)
    ours = nn.Linear(12, 20, bias=False)
    ref = copy.deepcopy(ours)
    start = ours.weight.detach().clone()
    opt = Muon(ours.parameters(), lr=1e-2, weight_decay=0.01)
    torch_opt = torch.optim.Muon(ref.parameters(), lr=1e-2, weight_decay=0.01, adjust_lr_fn="match_rms_adamw")
    for step in range(3):
        grad = torch.randn(20, 12, generator=torch.Generator().manual_seed(step))
        ours.weight.grad, ref.weight.grad = grad.clone(), grad.clone()
        opt.step()
        torch_opt.step()
    change = (ours.weight - start).abs().max()
    assert (ours.weight - ref.weight).abs().max() < 0.05 * change


@pytest.mark.parametrize("fused", [False, True])
def test_steps_equal_muon_and_torch_adamw_side_by_side(fused: bool) -> None:
    """Three steps of MuonAdamW equal Muon (at muon_lr_ratio × lr) on the linear weights beside torch's AdamW."""
    net = Net()
    ref = copy.deepcopy(net)
    lr, ratio, wd = 1e-2, 2.0, 0.01
    opt = MuonAdamW(net.parameters(), module=net, lr=lr, betas=(0.9, 0.99), weight_decay=wd, muon_lr_ratio=ratio,
                    fused=fused)
    mats = [ref.hidden.weight, ref.out.weight]
    rest = [p for p in ref.parameters() if all(p is not m for m in mats)]
    muon = Muon(mats, lr=lr * ratio, weight_decay=wd, momentum=0.95)
    adamw = torch.optim.AdamW(rest, lr=lr, betas=(0.9, 0.99), weight_decay=wd, fused=fused)
    for step in range(3):
        backward(net, step)
        backward(ref, step)
        opt.step()
        muon.step()
        adamw.step()
    for p, q in zip(net.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert opt.param_groups[0]["lr"] == lr  # the schedule's rate; the ratio scales it inside the step
    # torch.optim.AdamW's state keys: its moments are ours
    torch.testing.assert_close(opt.state[net.norm.weight]["exp_avg_sq"], adamw.state[ref.norm.weight]["exp_avg_sq"])


def test_muon_update_is_the_polar_factor_at_adamw_rms() -> None:
    """From zero momentum, ΔW = −lr·r·0.2·√max(m, n)·NS(G), and NS(G) ≈ U·Vᵀ of G's SVD (computed here by SVD)."""
    torch.manual_seed(0)
    layer = nn.Linear(12, 20, bias=False)
    lr, ratio = 1e-2, 3.0
    opt = MuonAdamW(layer.parameters(), module=layer, lr=lr, muon_lr_ratio=ratio)
    assert [g["muon"] for g in opt.param_groups] == [True]
    grad = torch.randn(20, 12)
    before = layer.weight.detach().clone()
    layer.weight.grad = grad.clone()
    opt.step()
    update = (before - layer.weight.detach()) / (lr * ratio * 0.2 * math.sqrt(20))
    u, _, vh = torch.linalg.svd(grad, full_matrices=False)
    polar = u @ vh
    cosine = (update * polar).sum() / (update.norm() * polar.norm())
    assert cosine > 0.95
    assert 0.7 < float(update.norm() / polar.norm()) < 1.3  # Newton-Schulz leaves singular values ~0.5-1.5


def test_resume_from_state_dict_continues_exactly() -> None:
    net = Net()
    opt = MuonAdamW(net.parameters(), module=net, lr=1e-2)
    for step in range(2):
        backward(net, step)
        opt.step()
    resumed = copy.deepcopy(net)
    state = copy.deepcopy(opt.state_dict())
    opt2 = MuonAdamW(resumed.parameters(), module=resumed, lr=5.0)  # the state restores the rates too
    opt2.load_state_dict(state)
    backward(net, 2)
    opt.step()
    backward(resumed, 2)
    opt2.step()
    for p, q in zip(net.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    with pytest.raises(ValueError, match="parameter groups"):  # torch's check: AdamW's one group is not our two
        opt2.load_state_dict(torch.optim.AdamW(resumed.parameters()).state_dict())


class Tiny(BaseModule):
    def __init__(self) -> None:
        super().__init__(functools.partial(MuonAdamW, lr=1e-2, betas=(0.9, 0.99)),
                         functools.partial(OneCycle, max_lr=1e-2, total_steps=10), "step")
        self.net = Net()


def test_configure_optimizers_passes_the_module_and_the_schedule_drives_both() -> None:
    module = Tiny()
    configured = module.configure_optimizers()
    opt, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    assert isinstance(opt, MuonAdamW)
    assert ids(opt, muon=True) == {id(module.net.hidden.weight), id(module.net.out.weight)}
    for _ in range(3):
        backward(module.net, 0)
        opt.step()
        scheduler.step()
    rates = {g["lr"] for g in opt.param_groups}
    assert len(rates) == 1 and 0 < rates.pop() < 1e-2  # one-cycle's warm-up/anneal reached both halves
    assert all(g["betas"][0] < 0.95 for g in opt.param_groups)  # and cycled AdamW's beta1


def test_no_linear_layer_is_a_clear_error() -> None:
    table = nn.Embedding(4, 3)
    with pytest.raises(ValueError, match="linear layer"):
        MuonAdamW(table.parameters(), module=table)


def test_newton_schulz_batches_matrices_of_one_shape_independently() -> None:
    """A batch [k, m, n] gives each matrix's own iteration (each normalised by its own norm), tall or wide."""
    torch.manual_seed(1)
    for shape in ((3, 6, 4), (3, 4, 6)):
        batch = torch.randn(*shape) * torch.tensor([0.01, 1.0, 100.0]).view(3, 1, 1)
        one_by_one = torch.stack([newton_schulz(m) for m in batch])
        torch.testing.assert_close(newton_schulz(batch), one_by_one, rtol=1e-5, atol=1e-6)


def test_newton_schulz_in_bfloat16_is_the_float32_iteration_rounded() -> None:
    """In bfloat16 the iteration lands within rounding of the float32 one (and is not it), singular values still
    pushed into [0.4, 1.6], returned in the update's dtype."""
    torch.manual_seed(2)
    update = torch.randn(4, 24, 40)
    full, half = newton_schulz(update), newton_schulz(update, dtype=torch.bfloat16)
    assert half.dtype == torch.float32
    assert 0 < float((half - full).abs().max()) < 0.05 * float(full.abs().max())
    singular = torch.linalg.svdvals(half)
    assert float(singular.min()) > 0.4 and float(singular.max()) < 1.6


def test_muon_iterates_in_its_ns_dtype() -> None:
    """One Muon step with ns_dtype=bfloat16 is W − lr·0.2·√max(m, n)·NS₅(U) with NS₅ in bfloat16 (U = the first
    Nesterov update, (1 − μ)·G + μ·(1 − μ)·G); a wrong name is refused at construction."""
    torch.manual_seed(3)
    layer = nn.Linear(16, 24, bias=False)
    start, grad = layer.weight.detach().clone(), torch.randn(24, 16)
    opt = Muon(layer.parameters(), lr=1e-2, momentum=0.95, ns_dtype="bfloat16")
    layer.weight.grad = grad.clone()
    opt.step()
    nesterov = grad.lerp(grad * 0.05, 0.95)
    for dtype, same in ((torch.bfloat16, True), (torch.float32, False)):
        expected = start - 1e-2 * 0.2 * math.sqrt(24) * newton_schulz(nesterov, dtype=dtype)
        assert torch.allclose(layer.weight.detach(), expected, rtol=0, atol=1e-7) is same
    with pytest.raises(ValueError, match="ns_dtype='float16'"):
        MuonAdamW(layer.parameters(), module=layer, ns_dtype="float16")
    assert ns_dtype_for("auto", torch.device("cuda")) == torch.bfloat16
    assert ns_dtype_for("float32", torch.device("cuda")) == torch.float32


def test_step_runs_the_closure_with_gradients_on() -> None:
    """Lightning steps with a closure that computes the loss and its gradients; step returns that loss."""
    net = Net()
    opt = MuonAdamW(net.parameters(), module=net, lr=1e-2)
    ids = torch.randint(0, 10, (5, 4), generator=torch.Generator().manual_seed(0))

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = net(ids).square().mean()
        loss.backward()
        return loss

    before = net.hidden.weight.detach().clone()
    with torch.no_grad():
        loss = opt.step(closure)
    assert loss is not None and loss.requires_grad
    assert not torch.equal(before, net.hidden.weight)


def sharded_steps(rank: int, out: str) -> None:
    """Three MuonAdamW steps of a `fully_shard`ed Net, both ranks on the same batches; rank 0 saves the whole
    parameters."""
    torch.manual_seed(0)
    net = Net()
    fully_shard(net)
    assert isinstance(net.out.weight, DTensor) and net.out.weight.to_local().shape[0] in (1, 2)  # 3 rows on 2
    opt = MuonAdamW(net.parameters(), module=net, lr=1e-2, weight_decay=0.01, muon_lr_ratio=2.0)
    for step in range(3):
        backward(net, step)
        opt.step()
    whole = {n: p.full_tensor() for n, p in net.named_parameters()}
    if rank == 0:
        torch.save(whole, Path(out) / "sharded.pt")


def test_fsdp_sharded_parameters_step_as_one_process(tmp_path: Path) -> None:
    """FSDP2 on 2 gloo processes: Newton-Schulz runs on each gathered matrix and each rank keeps its shard, so the
    parameters after three steps equal one unsharded process's."""
    spawn_gloo(sharded_steps, 2, str(tmp_path))
    sharded = torch.load(tmp_path / "sharded.pt", weights_only=True)
    torch.manual_seed(0)
    net = Net()
    start = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = MuonAdamW(net.parameters(), module=net, lr=1e-2, weight_decay=0.01, muon_lr_ratio=2.0)
    for step in range(3):
        backward(net, step)
        opt.step()
    for name, p in net.named_parameters():
        assert not torch.equal(p, start[name])
        torch.testing.assert_close(sharded[name], p.detach(), rtol=1e-5, atol=1e-6)
