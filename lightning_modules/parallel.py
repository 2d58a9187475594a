"""Apply parallelism to a plain model from outside, block by block (as torchtitan does).

The networks in `lightning_modules/nn/` know nothing of sharding. A LightningModule names its repeated units
(`BaseModule.shard_units()`, e.g. transformer blocks); `apply_parallelism` then, in this order:

1. wraps each unit in activation checkpointing (recompute its activations in backward: memory for compute),
2. applies FSDP2 `fully_shard` to each unit (one all-gather per unit in forward and backward),
3. applies `fully_shard` to the root module, which owns every parameter left over (embeddings, heads).

Called from `BaseModule.configure_model` under Lightning's `ModelParallelStrategy`; a no-op elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

MIXED_PRECISION = {
    None: None,
    "bf16": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
    "fp16": MixedPrecisionPolicy(param_dtype=torch.float16, reduce_dtype=torch.float32),
}


@dataclass
class ParallelConfig:
    """How `apply_parallelism` treats a model (from the `strategy.parallel` config node)."""

    mixed_precision: str | None = None
    activation_checkpointing: bool = False
    reshard_after_forward: bool = True

    def __post_init__(self) -> None:
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(
                f"strategy.parallel.mixed_precision={self.mixed_precision!r}; choose one of "
                f"{sorted(k for k in MIXED_PRECISION if k)} or null"
            )


def is_sharded(module: nn.Module) -> bool:
    """True once `fully_shard` has been applied to `module` (FSDP2 swaps its class)."""
    return any(cls.__name__.startswith("FSDP") for cls in type(module).__mro__)


def apply_parallelism(
    root: nn.Module, units: list[nn.Module], mesh: DeviceMesh | None, config: ParallelConfig
) -> None:
    """Activation checkpointing and FSDP2 for `units` (children of `root`), then FSDP2 for `root`.

    Without a mesh (single device, DDP) only activation checkpointing is applied. Idempotent: Lightning may
    call `configure_model` once per stage.
    """
    if is_sharded(root):
        return
    if config.activation_checkpointing:
        _checkpoint_units(root, units)
        units = [m for m in root.modules() if type(m).__name__ == "CheckpointWrapper"]
    if mesh is None:
        return
    policy = MIXED_PRECISION[config.mixed_precision]
    kwargs = {"mesh": mesh, "reshard_after_forward": config.reshard_after_forward}
    if policy is not None:
        kwargs["mp_policy"] = policy
    for unit in units:
        fully_shard(unit, **kwargs)
    fully_shard(root, **kwargs)


def _checkpoint_units(root: nn.Module, units: list[nn.Module]) -> None:
    """Replace each unit inside `root` by a checkpoint-wrapped version of itself."""
    wanted = {id(u) for u in units}
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if id(child) in wanted:
                setattr(parent, name, checkpoint_wrapper(child))
