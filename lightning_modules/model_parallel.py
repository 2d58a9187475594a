"""Tensor, sequence and context parallelism of the DiT, applied from outside (Movie Gen §3.1.6; torchtitan's way).

The device mesh is (dp, cp, tp), row-major: rank = (dp_index · cp + cp_index) · tp + tp_index.

- **dp**: FSDP2 shards the parameters over it (`parallel.parallelize`, which calls `apply_model_parallel` first); its ranks read different batches.
- **tp, tensor parallelism** (Megatron): in every block, Q, K, V and SwiGLU's W1, W3 are split by output columns
  (`ColwiseParallel`: each rank holds a share of the heads / of the hidden units) and the attention output and
  W2 by input rows (`RowwiseParallel`), with DTensor's `parallelize_module`. A block then costs two collectives
  per sub-layer: an all-gather of the tokens before it and a reduce-scatter of its output after it.
- **sequence parallelism** (with tp): between those sub-layers the residual stream stays split along the sequence,
  so the RMSNorms, adaLN modulations and residual adds run on 1/tp of the tokens (the norms are per-token: no
  communication).
- **cp, context parallelism** (the paper's scheme): the sequence is split over the cp ranks as well; in
  self-attention each rank attends its queries to the keys and values all-gathered from the whole group, and in
  the backward dK and dV are reduce-scattered back. Full bidirectional attention. The text's keys and values in
  cross-attention stay replicated.

The token stream of the blocks is thus split into cp·tp contiguous chunks along the sequence (chunk cp_index·tp
+ tp_index on each rank); the DiT's own code is unchanged: forward hooks split the tokens and the position table
before the first block and gather the tokens after the last, before the output layer (everything in between is
per token, or one of the collectives above). All ranks of one (cp, tp) group see the same batch and the same random numbers
(`broadcast_batch`) and compute the same loss on the gathered output.

Gradients. The split's backward all-gathers, and a replicated tensor consumed by every chunk (the adaLN
modulation, the text in cross-attention without tp) passes through `_SumGradients` (identity forward,
all-reduce backward), so everything outside the blocks gets its whole gradient on every rank. Inside the blocks a
parameter that is applied to one chunk of the tokens (every parameter under cp; the norms and modulation tables
under tp) holds the gradient of its chunk only: `sync_gradients` sums those over the group, once per optimizer
step, before clipping. Tensor-parallel weights see every token of their cp chunk through the all-gather, so they
are summed over cp only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    parallelize_module,
)

from lightning_modules.nn.dit import Block


# -- collectives with the backward each one needs ------------------------------------------------------------
def _all_gather(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Sum over the group, then this rank's chunk along `dim`."""
    chunks = [c.contiguous() for c in x.chunk(dist.get_world_size(group), dim=dim)]
    out = torch.empty_like(chunks[0])
    dist.reduce_scatter(out, chunks, group=group)
    return out


class _Split(torch.autograd.Function):
    """Forward: this rank's chunk of x along `dim`. Backward: the chunks' gradients all-gathered."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        return x.chunk(dist.get_world_size(group), dim=dim)[dist.get_rank(group)].contiguous()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return _all_gather(grad, ctx.dim, ctx.group), None, None


class _Gather(torch.autograd.Function):
    """Forward: the chunks all-gathered along `dim`. Backward: this rank's chunk of the gradient (every rank
    computes the same loss of the gathered tensor, so its gradient is already whole on each)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad.chunk(dist.get_world_size(ctx.group), dim=ctx.dim)[dist.get_rank(ctx.group)].contiguous(), None, None


class _GatherKV(torch.autograd.Function):
    """Context parallelism's attention (the paper's): forward all-gathers K or V [B, H, L/cp, D] along the
    sequence; backward reduce-scatters dK or dV (each rank's queries contribute to every key)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _all_gather(x, 2, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _reduce_scatter(grad, 2, ctx.group), None


class _SumGradients(torch.autograd.Function):
    """Forward: identity. Backward: the gradient summed over the group (a replicated input of split work)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


# -- the meshes ----------------------------------------------------------------------------------------------
@dataclass
class ModelParallel:
    """The (dp, cp, tp) mesh and the groups the hooks use (`build`)."""

    mesh: DeviceMesh                      # ("dp", "cp", "tp")
    sequence: dist.ProcessGroup | None    # the cp·tp ranks that share one clip's tokens (None when cp = tp = 1)
    cp_group: dist.ProcessGroup | None
    # group name -> (module, parameter name) to sum; not the parameters, which FSDP2 replaces after
    sums: dict[str, list[tuple[nn.Module, str]]] = field(default_factory=dict)

    @property
    def tp(self) -> int:
        return self.mesh["tp"].size()

    @property
    def cp(self) -> int:
        return self.mesh["cp"].size()

    @property
    def dp_mesh(self) -> DeviceMesh:
        return self.mesh["dp"]

    def group(self, name: str) -> dist.ProcessGroup | None:
        return {"sequence": self.sequence, "cp": self.cp_group}[name]

    @classmethod
    def build(cls, device_type: str, world_size: int, tp: int = 1, cp: int = 1) -> ModelParallel:
        if tp < 1 or cp < 1 or world_size % (tp * cp):
            raise ValueError(f"{world_size} processes do not split into tensor_parallel_size={tp} x "
                             f"context_parallel_size={cp} x a data-parallel size")
        dp = world_size // (tp * cp)
        mesh = init_device_mesh(device_type, (dp, cp, tp), mesh_dim_names=("dp", "cp", "tp"))
        # One flat group per data-parallel index for the cp·tp ranks of a clip (row-major: chunk = cp_i·tp + tp_i).
        flat = init_device_mesh(device_type, (dp, cp * tp), mesh_dim_names=("dp", "sequence"))
        return cls(mesh, flat.get_group("sequence") if cp * tp > 1 else None,
                   mesh.get_group("cp") if cp > 1 else None)


# -- applying it to a DiT ------------------------------------------------------------------------------------
def _block_plan() -> dict[str, Any]:
    """Megatron's split of one Movie Gen block, sequence-parallel between the sub-layers."""
    gather = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))  # all-gather tokens
    return {
        "attn": gather,
        "attn.to_q": ColwiseParallel(), "attn.to_k": ColwiseParallel(), "attn.to_v": ColwiseParallel(),
        "attn.to_out": RowwiseParallel(output_layouts=Shard(1)),
        "cross": PrepareModuleInput(input_layouts=(Shard(1), Replicate()),
                                    desired_input_layouts=(Replicate(), Replicate())),
        "cross.to_q": ColwiseParallel(), "cross.to_k": ColwiseParallel(), "cross.to_v": ColwiseParallel(),
        "cross.to_out": RowwiseParallel(output_layouts=Shard(1)),
        "ffn": gather,
        "ffn.w1": ColwiseParallel(), "ffn.w3": ColwiseParallel(),
        "ffn.w2": RowwiseParallel(output_layouts=Shard(1)),
    }


def check_divisible(net: nn.Module, parallel: ModelParallel) -> None:
    """Heads, FFN width and (at run time) tokens must split evenly; say which does not."""
    if net.heads % parallel.tp or net.ffn_dim % parallel.tp:
        raise ValueError(f"tensor_parallel_size={parallel.tp} must divide the DiT's heads ({net.heads}) and "
                         f"ffn_dim ({net.ffn_dim})")


def apply_model_parallel(net: nn.Module, parallel: ModelParallel) -> None:
    """Tensor, sequence and context parallelism for a `nn.dit.DiT` (see the module docstring). Call it before
    FSDP (on `parallel.dp_mesh`), as torchtitan does. Records in `parallel.sums` which parameters
    `sync_gradients` must sum."""
    if parallel.sequence is None:
        return
    check_divisible(net, parallel)
    blocks = [m for m in net.modules() if isinstance(m, Block)]
    if parallel.tp > 1:
        for block in blocks:
            parallelize_module(block, parallel.mesh["tp"], _block_plan())
    if parallel.cp > 1:
        group = parallel.cp_group
        for block in blocks:
            block.attn.kv_hook = lambda k, v: (_GatherKV.apply(k, group), _GatherKV.apply(v, group))
    _split_hooks(net, blocks, parallel)
    in_blocks = [(m, name, p) for b in blocks for m in b.modules() for name, p in m.named_parameters(recurse=False)]
    parallel.sums = {"sequence": [(m, name) for m, name, p in in_blocks if not isinstance(p, DTensor)],
                     "cp": [(m, name) for m, name, p in in_blocks if isinstance(p, DTensor)] if parallel.cp > 1 else []}


def _split_hooks(net: nn.Module, blocks: list[nn.Module], parallel: ModelParallel) -> None:
    """Split the tokens and position table on entry to each block, sum the gradients of the replicated inputs,
    gather the tokens after the last block (the output layer runs on all of them)."""
    group, cp_group = parallel.sequence, parallel.cp_group
    first = blocks[0]

    def enter_block(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        x, pe, modulation, context, *rest = args  # rest: Block's context_mask, context_segments, rotary
        if module is first:
            if x.shape[1] % dist.get_world_size(group):
                raise ValueError(f"{x.shape[1]} tokens do not split over {dist.get_world_size(group)} "
                                 "sequence-parallel ranks (tensor_parallel_size x context_parallel_size)")
            x = _Split.apply(x, 1, group)
        pe = _Split.apply(pe, 0, group)
        modulation = _SumGradients.apply(modulation, group)
        if cp_group is not None:  # without tp, cross-attention's keys see the text on every cp rank alike
            context = _SumGradients.apply(context, cp_group)
            if len(rest) > 2 and rest[2] is not None:
                # RoPE turns q and k in attention, where a cp rank holds its cp chunk of the tokens (tp's gather
                # undoes the tp split): the angles of that chunk, so that the gathered keys keep their positions
                rotary = rest[2]
                rest[2] = rotary.chunk(dist.get_world_size(cp_group), dim=-2)[dist.get_rank(cp_group)]
        return (x, pe, modulation, context, *rest), kwargs

    def leave_blocks(module: nn.Module, args: tuple) -> tuple:
        return (_Gather.apply(args[0], 1, group), *args[1:])

    for block in blocks:
        block.register_forward_pre_hook(enter_block, with_kwargs=True)
    net.norm_out.register_forward_pre_hook(leave_blocks)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def sync_gradients(parallel: ModelParallel | None) -> None:
    """Sum the chunk-wise gradients of the block parameters over their group (see the module docstring)."""
    if parallel is None:
        return
    for name, params in parallel.sums.items():
        group = parallel.group(name)
        if group is None:
            continue
        for module, name in params:
            p = getattr(module, name)
            if p.grad is not None:
                dist.all_reduce(_local(p.grad), group=group)


@torch.no_grad()
def clip_grad_norm(parameters: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` for gradients on different meshes (FSDP's dp, FSDP x TP's (dp, tp)),
    which PyTorch's cannot stack: each norm is made whole (`full_tensor`) first. Returns the total norm."""
    grads = [p.grad for p in parameters if p.grad is not None]
    norms = [g.norm() for g in grads]
    total = torch.stack([n.full_tensor() if isinstance(n, DTensor) else n for n in norms]).norm()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        _local(g).mul_(scale)
    return total


def broadcast_batch(batch: Any, parallel: ModelParallel | None) -> Any:
    """The batch (and the CPU random state) of the first rank of this rank's (cp, tp) group, on every rank of
    it: they must train on the same clips with the same noise."""
    if parallel is None or parallel.sequence is None:
        return batch
    payload = [batch, torch.get_rng_state()]
    dist.broadcast_object_list(payload, group=parallel.sequence, group_src=0)
    torch.set_rng_state(payload[1])
    return payload[0]
