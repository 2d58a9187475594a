"""Muon for a network's hidden matrices and AdamW for the rest, as one optimizer.

Muon (Jordan et al. 2024; `torch.optim.Muon`) steps a weight matrix W [m, n] with gradient G by

    B ← μ·B + (1 − μ)·G                  momentum
    U = (1 − μ)·G + μ·B                  Nesterov
    O = NS₅(U)                           five Newton-Schulz iterations: ≈ the orthogonal polar factor of U
                                         (singular values pushed to ~[0.5, 1.5]), so every direction moves alike
    W ← (1 − lr·λ)·W − lr·r·0.2·√max(m, n)·O

The factor 0.2·√max(m, n) ("match_rms_adamw") gives the update the RMS of an AdamW step, so one learning rate (and
one schedule) serves both halves; r (`muon_lr_ratio`) scales Muon's side. Muon is only for the weights of linear
layers; embeddings, position and modulation tables, norms, biases and convolutions keep AdamW (they are looked up or
added, not multiplied by an input, and have no matrix geometry to orthogonalise).

`Muon` is `torch.optim.Muon` with the Newton-Schulz iterations in float32 by default: torch's run in bfloat16, whose
matmuls are ~30x slower than float32 on CPUs without bfloat16 units (a quickstart step took 5x as long there); on a
GPU the difference is rounding. `ns_dtype="auto"` runs them in bfloat16 where its matmuls are fast (CUDA; CPUs with
AMX or AVX512-BF16): on a Xeon with AMX, experiment=t2v_upright's optimizer step takes 44 ms instead of 86.
`MuonAdamW` is one optimizer whose parameter groups say which rule steps them (`group["muon"]`); the AdamW groups go
through torch's own AdamW function (fused or foreach). One optimizer with one state keyed by parameter is what
Lightning drives, a schedule sets (`schedules.OneCycle` sets every group's rate and cycles β₁), and torch's
distributed checkpoint maps to parameter names. Use it with
`model.optimizer._target_=lightning_modules.optimizers.MuonAdamW` (the module passes itself as `module`).

Sharded parameters (FSDP2, tensor parallel: DTensors) work: each rank gathers a matrix's update, orthogonalises the
whole matrix and keeps its own shard of the result. Every rank repeats every matrix's Newton-Schulz, which is cheap
at the sizes this repository trains; at scale one would give each rank its share of the matrices instead.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.optim.adamw import adamw

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # the quintic's a, b, c (Jordan et al.; torch.optim.Muon's)


NS_DTYPES = ("float32", "bfloat16", "auto")


@functools.cache  # asked every optimizer step; the hardware does not change
def fast_bfloat16(device: torch.device) -> bool:
    """Whether bfloat16 matmuls beat float32 on `device`: on CUDA, and on CPUs with AMX tiles or AVX512-BF16
    (elsewhere the CPU converts every element and a bfloat16 matmul is ~30x slower)."""
    if device.type == "cuda":
        return True
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # torch.cpu's, private: absent means no
    return device.type == "cpu" and any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def ns_dtype_for(name: str, device: torch.device) -> torch.dtype:
    """The dtype of the Newton-Schulz iterations: `name` from NS_DTYPES ("auto": bfloat16 where `fast_bfloat16`)."""
    if name not in NS_DTYPES:
        raise ValueError(f"Muon's ns_dtype={name!r} must be one of {list(NS_DTYPES)}")
    if name == "auto":
        return torch.bfloat16 if fast_bfloat16(device) else torch.float32
    return getattr(torch, name)


def newton_schulz(update: torch.Tensor, steps: int = 5, eps: float = 1e-7,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """≈ the orthogonal polar factor U·Vᵀ of each matrix U·S·Vᵀ in `update` [..., m, n], iterated in `dtype`:
    X ← a·X + (b·XXᵀ + c·(XXᵀ)²)·X from X = update / ‖update‖_F (spectral norm ≤ 1, normalised in float32), on
    the wide orientation (XXᵀ the smaller Gram matrix). Matrices of one shape go as one batch: on these small
    layers the per-op overhead, not the arithmetic, is what a step costs."""
    a, b, c = NS_COEFFICIENTS
    x = update.float().reshape(-1, *update.shape[-2:])
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    x = (x / x.norm(dim=(-2, -1), keepdim=True).clamp_min(eps)).to(dtype)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.mT if tall else x).reshape(update.shape).to(update.dtype)


def closure_loss(closure: Any) -> Any:
    """The loss of an optimizer step's closure (evaluated with gradients on), or None without one."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def muon_update(state: dict[torch.Tensor, dict[str, Any]], group: dict[str, Any]) -> None:
    """One Muon step of `group`'s matrices (the module docstring), keeping the momentum in `state[p]`."""
    lr, mu = group["lr"] * group["lr_ratio"], group["momentum"]
    by_shape: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for p in group["params"]:
        if p.grad is None:
            continue
        if p.ndim != 2:
            raise ValueError(f"Muon steps matrices only, got a parameter of shape {tuple(p.shape)}")
        if "momentum_buffer" not in state[p]:
            state[p]["momentum_buffer"] = torch.zeros_like(p)
        buf = state[p]["momentum_buffer"]
        buf.lerp_(p.grad, 1 - mu)
        update = p.grad.lerp(buf, mu)
        by_shape.setdefault(tuple(p.shape), []).append(
            (p, update.full_tensor() if isinstance(update, DTensor) else update))
    for shape, items in by_shape.items():
        stacked = torch.stack([u for _, u in items])
        # .get: an optimizer state saved before ns_dtype existed restores groups without it
        updates = newton_schulz(stacked, dtype=ns_dtype_for(group.get("ns_dtype", "float32"), stacked.device))
        for (p, _), update in zip(items, updates, strict=True):
            if isinstance(p, DTensor):  # this rank's shard of the whole matrix's update, without communication
                update = distribute_tensor(update, p.device_mesh, p.placements, src_data_rank=None)
            p.mul_(1 - lr * group["weight_decay"])
            p.add_(update, alpha=-lr * 0.2 * math.sqrt(max(shape)))


def adamw_update(state: dict[torch.Tensor, dict[str, Any]], group: dict[str, Any]) -> None:
    """One AdamW step of `group` through torch's AdamW function, with torch.optim.AdamW's state keys."""
    params = [p for p in group["params"] if p.grad is not None]
    for p in params:
        if not state[p]:
            # as torch.optim.AdamW keeps it: a float32 count, on the parameter's device only for the fused kernel
            step = torch.zeros((), dtype=torch.float32, device=p.device if group["fused"] else "cpu")
            state[p].update(step=step, exp_avg=torch.zeros_like(p),
                            exp_avg_sq=torch.zeros_like(p))
    beta1, beta2 = group["betas"]
    adamw(params, [p.grad for p in params], [state[p]["exp_avg"] for p in params],
          [state[p]["exp_avg_sq"] for p in params], [], [state[p]["step"] for p in params],
          fused=group["fused"], amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
          weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


class Muon(torch.optim.Optimizer):
    """torch.optim.Muon's update (Nesterov, match_rms_adamw; the module docstring) with `newton_schulz` in
    `ns_dtype`: "float32" (the default), "bfloat16" or "auto" (`ns_dtype_for`)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, weight_decay: float = 0.0,
                 momentum: float = 0.95, lr_ratio: float = 1.0, ns_dtype: str = "float32") -> None:
        # lr_ratio scales the rate a schedule sets in group["lr"] (MuonAdamW's muon_lr_ratio)
        ns_dtype_for(ns_dtype, torch.device("cpu"))  # a wrong name fails here, not at the first step
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum,
                                  "lr_ratio": lr_ratio, "ns_dtype": ns_dtype})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure_loss(closure)
        for group in self.param_groups:
            muon_update(self.state, group)
        return loss


def build_optimizer(factory: Callable[..., torch.optim.Optimizer], params: Iterable[Any],
                    module: nn.Module) -> torch.optim.Optimizer:
    """factory(params), with `module=module` for an optimizer that asks for the network (`MuonAdamW` tells its
    matrices from its tables by it)."""
    takes_module = "module" in inspect.signature(factory).parameters
    return factory(params, **({"module": module} if takes_module else {}))


def linear_weights(module: nn.Module) -> set[int]:
    """ids of the weights of every `nn.Linear` in `module`: the matrices Muon steps."""
    return {id(m.weight) for m in module.modules() if isinstance(m, nn.Linear)}


class MuonAdamW(torch.optim.Optimizer):
    """Muon on `module`'s linear weights among `params`, AdamW on the other `params` (see the module docstring).

    Each given group becomes a Muon group (`muon: True`) and an AdamW group, keeping its options.

    Args:
        params: the parameters to train (tensors, or param groups whose options are kept).
        module: the network they belong to (passed by `BaseModule.configure_optimizers`).
        lr, betas, weight_decay, eps, fused: AdamW's (`lr` and `weight_decay` also Muon's).
        momentum: Muon's μ. muon_lr_ratio: r, Muon's learning rate over AdamW's.
        ns_dtype: the Newton-Schulz iterations' dtype, "float32", "bfloat16" or "auto" (`ns_dtype_for`).
    """

    def __init__(self, params: Iterable[Any], module: nn.Module, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0, eps: float = 1e-8,
                 momentum: float = 0.95, muon_lr_ratio: float = 1.0, fused: bool | None = None,
                 ns_dtype: str = "float32") -> None:
        ns_dtype_for(ns_dtype, torch.device("cpu"))  # a wrong name fails here, not at the first step
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        matrices = linear_weights(module)
        split = []
        for group in groups:
            ps, options = list(group["params"]), {k: v for k, v in group.items() if k != "params"}
            split.append({**options, "muon": True, "params": [p for p in ps if id(p) in matrices]})
            split.append({**options, "muon": False, "params": [p for p in ps if id(p) not in matrices]})
        split = [g for g in split if g["params"]]
        if not any(g["muon"] for g in split):
            raise ValueError(f"MuonAdamW: none of the {sum(len(g['params']) for g in split)} parameters is a "
                             "linear layer's weight; use torch.optim.AdamW")
        super().__init__(split, {"lr": lr, "betas": betas, "weight_decay": weight_decay, "eps": eps,
                                 "momentum": momentum, "lr_ratio": muon_lr_ratio, "fused": fused,
                                 "ns_dtype": ns_dtype})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure_loss(closure)
        for group in self.param_groups:
            (muon_update if group["muon"] else adamw_update)(self.state, group)
        return loss
