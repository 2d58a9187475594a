"""MuonAdamW: which parameters Muon steps, its update against torch's optimizers and against the polar factor,
resume, and the schedule driving both halves through `BaseModule.configure_optimizers`."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from torch import nn

from lightning_modules.base import BaseModule
from lightning_modules.optimizers import Muon, MuonAdamW, newton_schulz
from lightning_modules.schedules import OneCycle


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


def test_muon_steps_the_linear_weights_only() -> None:
    net = Net()
    opt = MuonAdamW(net.parameters(), module=net, lr=1e-3)
    muon = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    adamw = {id(p) for g in opt.adamw.param_groups for p in g["params"]}
    assert muon == {id(net.hidden.weight), id(net.out.weight)}
    assert adamw == {id(p) for p in net.parameters()} - muon  # embedding, table, norm, biases
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


def test_steps_equal_muon_and_torch_adamw_side_by_side() -> None:
    """Three steps of MuonAdamW equal Muon (at muon_lr_ratio × lr) on the linear weights beside torch's AdamW."""
    net = Net()
    ref = copy.deepcopy(net)
    lr, ratio, wd = 1e-2, 2.0, 0.01
    opt = MuonAdamW(net.parameters(), module=net, lr=lr, betas=(0.9, 0.99), weight_decay=wd, muon_lr_ratio=ratio)
    mats = [ref.hidden.weight, ref.out.weight]
    rest = [p for p in ref.parameters() if all(p is not m for m in mats)]
    muon = Muon(mats, lr=lr * ratio, weight_decay=wd, momentum=0.95)
    adamw = torch.optim.AdamW(rest, lr=lr, betas=(0.9, 0.99), weight_decay=wd)
    for step in range(3):
        backward(net, step)
        backward(ref, step)
        opt.step()
        muon.step()
        adamw.step()
    for p, q in zip(net.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert opt.muon.param_groups[0]["lr"] == lr  # the schedule's rate; the ratio scales it inside the step


def test_muon_update_is_the_polar_factor_at_adamw_rms() -> None:
    """From zero momentum, ΔW = −lr·r·0.2·√max(m, n)·NS(G), and NS(G) ≈ U·Vᵀ of G's SVD (computed here by SVD)."""
    torch.manual_seed(0)
    layer = nn.Linear(12, 20, bias=False)
    lr, ratio = 1e-2, 3.0
    opt = MuonAdamW(layer.parameters(), module=layer, lr=lr, muon_lr_ratio=ratio)
    assert opt.adamw is None
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
    opt2.param_groups[0]["lr"] = 0.123  # after loading, the shown groups are still the children's
    assert opt2.muon.param_groups[0]["lr"] == 0.123
    with pytest.raises(ValueError, match="another optimizer"):
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
    assert {id(p) for p in opt.muon.param_groups[0]["params"]} == {id(module.net.hidden.weight),
                                                                    id(module.net.out.weight)}
    for _ in range(3):
        backward(module.net, 0)
        opt.step()
        scheduler.step()
    rates = {g["lr"] for child in (opt.muon, opt.adamw) for g in child.param_groups}
    assert len(rates) == 1 and 0 < rates.pop() < 1e-2  # one-cycle's warm-up/anneal reached both halves
    assert opt.adamw.param_groups[0]["betas"][0] < 0.95  # and cycled AdamW's beta1


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
