"""Apply parallelism to a plain model from outside, block by block, and build it without its memory (torchtitan's order).

The networks in `lightning_modules/nn/` know nothing of sharding. A LightningModule names its repeated units
(`BaseModule.shard_units()`, e.g. transformer blocks) and its backbone; `parallelize` then, in this order:

0. splits the backbone with tensor and context parallelism when configured (`lightning_modules.model_parallel`:
   a (dp, cp, tp) mesh; what follows shards over dp),
1. wraps each unit in activation checkpointing (recompute its activations in backward: memory for compute),
2. applies FSDP2 `fully_shard` to each unit (one all-gather per unit in forward and backward),
3. applies `fully_shard` to the root module, which owns every parameter left over (embeddings, heads).

Called from `BaseModule.configure_model` under Lightning's `ModelParallelStrategy`; a no-op elsewhere.

Meta-device initialisation (`strategy.parallel.meta_init`, on by default with `strategy=fsdp`)
-----------------------------------------------------------------------------------------------
At paper scale no rank can hold the whole model, so the order is: build on the meta device (shapes, no storage),
shard, then allocate and initialise each rank's shards only. The contract:

- **A network that can be built on the meta device defines `init_weights()`**: it gives every parameter and
  buffer of its subtree its initial value, using only `nn.init` functions and in-place ops (`zero_`, `fill_`,
  `normal_`, `copy_` from tensors it computes), never reading the current values. It is the single source of
  the network's initialisation: its `__init__` calls it too, so a normal build and a materialised one draw from
  the same distributions. It must work on DTensor shards (no Python-scalar `__setitem__`: DTensors have no
  sharding rule for `fill_.Tensor`; use `t[:, a:].zero_()` and friends). Today: `nn.dit.DiT`,
  `nn.text.TextConditioner`, `nn.text.ByteEncoder`, `nn.attention.Attention`.
- **Only such networks go on the meta device.** The runner rewrites the model config so that every node whose
  class defines `init_weights` is built by `build_on_meta` (`meta_init_config`); everything else is built as
  usual: frozen codecs and Hugging Face encoders that load weights in `__init__`, the LightningModule's own
  buffers (latent statistics), tokenizers. Hydra builds children before parents, so a frozen encoder inside a
  `TextConditioner` stays real while the conditioner's own projections are meta.
- **`materialise(root, device, mesh)`** runs after `apply_parallelism` (from `BaseModule.configure_model`): it
  allocates every tensor still on the meta device on `device` (each rank only its local shards), calls
  `init_weights()` once on each outermost network that owns meta tensors (under `torch.no_grad`), and checks the
  result: a meta tensor no `init_weights` covers is an error before any allocation, and a tensor that
  `init_weights` left unset (they are filled with NaN first) is an error naming it. Tensors of those networks
  that already hold values (weights loaded before `configure_model`, which `BaseModule.load_state_dict` assigns
  into a meta model) keep them.
- Lightning's own materialisation (`_materialize_distributed_module` in `ModelParallelStrategy.setup`) calls
  `reset_parameters()` on *every* submodule with tensors, which would re-randomise adaLN-Zero's zero layers with
  `nn.Linear`'s default init and leave custom parameters (position tables, modulation tables) as garbage. It only
  runs when meta tensors are left after `configure_model`, and `materialise` leaves none, so it never runs.
- Random init draws per shard. On CUDA, DTensor's RNG tracker gives every shard its own slice of one random
  stream. On CPU (gloo tests) DTensor has no tracker: every rank would draw the *same* numbers for its shard,
  so each rank draws from its own seed (derived from the common RNG state and the rank). Tensors that are not
  sharded (buffers) are broadcast from the first rank, so replicas stay identical whatever `init_weights` draws.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from lightning_modules.model_parallel import ModelParallel, apply_model_parallel

MIXED_PRECISION = {
    None: None,
    "bf16": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
    "fp16": MixedPrecisionPolicy(param_dtype=torch.float16, reduce_dtype=torch.float32),
}

# Hydra keys that are not constructor arguments.
_HYDRA_KEYS = ("_target_", "_args_", "_recursive_", "_convert_", "_partial_")


@dataclass
class ParallelConfig:
    """How `apply_parallelism` treats a model (from the `strategy.parallel` config node).

    meta_init: build the networks that define `init_weights()` on the meta device and materialise them per shard
        after sharding (see the module docstring). Used by the runner for fit / validate / test.
    tensor_parallel_size, context_parallel_size: TP and CP of the backbone (`lightning_modules.model_parallel`).
    """

    mixed_precision: str | None = None
    activation_checkpointing: bool = False
    reshard_after_forward: bool = True
    meta_init: bool = False
    tensor_parallel_size: int = 1     # from the strategy (lightning_modules/model_parallel.py)
    context_parallel_size: int = 1

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
    call `configure_model` once per stage. Works on meta tensors (sharding needs shapes only).
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


def parallelize(root: nn.Module, units: list[nn.Module], backbone: nn.Module | None, device_mesh: DeviceMesh | None,
                config: ParallelConfig, done: ModelParallel | None = None) -> tuple[DeviceMesh | None, ModelParallel | None]:
    """Every parallelism of a LightningModule, in torchtitan's order: tensor and context parallelism of the
    `backbone` (`lightning_modules.model_parallel`, when tensor_parallel_size x context_parallel_size > 1), then
    activation checkpointing and FSDP2 over the data-parallel ranks (`apply_parallelism`).

    device_mesh: Lightning's (data_parallel, tensor_parallel) mesh, or None (one process, DDP). `done`: the
    split of an earlier call (Lightning may call configure_model once per stage), reused. Returns the mesh FSDP
    shards over and the split (None without TP / CP)."""
    mesh = device_mesh["data_parallel"] if device_mesh is not None else None
    split = done
    if mesh is not None and config.tensor_parallel_size * config.context_parallel_size > 1:
        if split is None:
            if backbone is None:
                raise ValueError(f"strategy.tensor_parallel_size / strategy.context_parallel_size: "
                                 f"{type(root).__name__} has no backbone to split")
            if device_mesh.device_type == "cpu" and has_meta_tensors(root):
                raise ValueError("tensor / context parallelism on CPU processes needs strategy.parallel.meta_init=false "
                                 "(DTensor has no CPU random-number tracker to initialise tensor-parallel shards)")
            split = ModelParallel.build(device_mesh.device_type, device_mesh.size(),
                                        tp=config.tensor_parallel_size, cp=config.context_parallel_size)
            apply_model_parallel(backbone, split)
        mesh = split.dp_mesh
    apply_parallelism(root, units, mesh, config)
    return mesh, split


def _checkpoint_units(root: nn.Module, units: list[nn.Module]) -> None:
    """Replace each unit inside `root` by a checkpoint-wrapped version of itself."""
    wanted = {id(u) for u in units}
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if id(child) in wanted:
                setattr(parent, name, checkpoint_wrapper(child))


# -- building on the meta device ---------------------------------------------------------------------------------
def defines_init_weights(cls_or_module: type | nn.Module) -> bool:
    """Whether a network class (or instance) follows the meta-init contract: it has a callable `init_weights`."""
    return callable(getattr(cls_or_module, "init_weights", None))


def _locate(path: str) -> Any:
    """The object at a dotted path (`package.module.Class`), like Hydra's `_target_` lookup."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    return importlib.import_module(path)


def build_on_meta(target: str, *args: Any, **kwargs: Any) -> nn.Module:
    """`target(*args, **kwargs)` with every tensor its constructor creates on the meta device (no storage).

    Hydra has already built the arguments (children first), so a real module passed in stays real.
    """
    cls = _locate(target)
    with torch.device("meta"):
        return cls(*args, **kwargs)


def meta_init_config(node: Any) -> Any:
    """A copy of a resolved model config (plain dicts and lists) in which every node whose `_target_` is an
    `nn.Module` class that defines `init_weights` is built by `build_on_meta` instead.

    Partial nodes (factories) and the children of `_recursive_: false` nodes (their owner instantiates them
    itself) are left alone.
    """
    if isinstance(node, list):
        return [meta_init_config(v) for v in node]
    if not isinstance(node, dict):
        return node
    recurse = node.get("_recursive_", True) is not False
    out = {k: (meta_init_config(v) if recurse and k not in _HYDRA_KEYS else v) for k, v in node.items()}
    target = node.get("_target_")
    if not isinstance(target, str) or node.get("_partial_", False):
        return out
    try:
        cls = _locate(target)
    except (ImportError, AttributeError):
        return out  # Hydra reports a wrong target with its own, clearer error
    if isinstance(cls, type) and issubclass(cls, nn.Module) and defines_init_weights(cls):
        out["_target_"] = f"{__name__}.{build_on_meta.__name__}"
        out["_args_"] = [target, *node.get("_args_", [])]
    return out


@contextlib.contextmanager
def meta_build_guard() -> Iterator[None]:
    """Around the instantiation of a model with meta parts: loading weights into a meta tensor (which PyTorch
    silently skips with a warning) is an error, so a constructor that loads a checkpoint into a network built
    on meta fails instead of training from uninitialised memory."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r".*copying from a non-meta parameter.*meta.*no-op")
        yield


def has_meta_tensors(module: nn.Module) -> bool:
    return any(t.is_meta for t in itertools.chain(module.parameters(), module.buffers()))


# -- materialisation ---------------------------------------------------------------------------------------------
@dataclass
class Materialised:
    """What `materialise` allocated and initialised on this rank."""

    tensors: int
    local_bytes: int
    full_bytes: int
    owners: list[str]


def _named_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from module.named_parameters()
    yield from module.named_buffers()


def _local(t: torch.Tensor) -> torch.Tensor:
    """The storage this rank holds: a DTensor's local shard (in-place ops on it change the DTensor)."""
    return t.to_local() if isinstance(t, DTensor) else t


def init_owners(root: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
    """Qualified name → module for the outermost modules under `root` (itself included) that define
    `init_weights`: each is responsible for its whole subtree."""
    if defines_init_weights(root):
        return {prefix: root}
    owners: dict[str, nn.Module] = {}
    for name, child in root.named_children():
        owners.update(init_owners(child, f"{prefix}{name}."))
    return owners


def _owner_of(name: str, owners: dict[str, nn.Module]) -> str | None:
    matches = [p for p in owners if name.startswith(p)]
    return max(matches, key=len) if matches else None


@contextlib.contextmanager
def _shard_local_rng(mesh: DeviceMesh | None) -> Iterator[None]:
    """Random init that differs between shards (see the module docstring): on a CPU mesh, fork the CPU RNG
    with a seed from the common RNG state and this rank's mesh coordinate; elsewhere DTensor's tracker does it."""
    if mesh is None or mesh.size() == 1 or mesh.device_type != "cpu":
        yield
        return
    # Every rank draws the same base (their RNGs were seeded alike), so the global stream stays in step.
    base = int(torch.randint(0, 2**62, (1,)).item())
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="DTensor random operators may not have complete support")
        torch.manual_seed(base + 1_000_003 * (mesh.get_local_rank() + 1))
        yield


def materialise(root: nn.Module, device: torch.device | str, mesh: DeviceMesh | None = None) -> Materialised | None:
    """Allocate the meta tensors of `root` on `device` (local shards only) and initialise them with the
    `init_weights()` of the networks that own them (see the module docstring). Returns None when `root` has no
    meta tensor; raises when a meta tensor has no owner or an owner leaves one unset."""
    device = torch.device(device)
    meta_names = [name for name, t in _named_tensors(root) if t.is_meta]
    if not meta_names:
        return None
    owners = init_owners(root)
    owner_of = {name: _owner_of(name, owners) for name in meta_names}
    orphans = sorted(name for name, owner in owner_of.items() if owner is None)
    if orphans:
        raise ValueError(
            f"{len(orphans)} tensors are on the meta device but no module above them defines init_weights(), so "
            f"nothing can initialise them: {orphans[:8]}{' ...' if len(orphans) > 8 else ''}. Build them off the "
            "meta device (only networks with init_weights belong there), or give their network an init_weights()")
    if device.type == "cpu" and mesh is not None and mesh.size() > 1:
        _require_shard_placements(root, set(meta_names))

    # Allocate only what is on meta (to_empty would also wipe loaded and frozen tensors). FSDP2 modules
    # re-register their sharded parameters in their `_apply`, which is why this goes through `_apply`.
    root._apply(lambda t: torch.empty_like(t, device=device) if t.is_meta else t)
    tensors = dict(_named_tensors(root))
    fresh = {name: tensors[name] for name in meta_names}
    with torch.no_grad():
        for t in fresh.values():
            if t.is_floating_point():
                _local(t).fill_(float("nan"))  # anything init_weights forgets stays NaN and is caught below
        used = sorted({owner_of[name] for name in meta_names})
        with _shard_local_rng(mesh):
            for prefix in used:
                kept = {name: _local(t).clone() for name, t in tensors.items()
                        if name.startswith(prefix) and name not in fresh}
                owners[prefix].init_weights()
                for name, value in kept.items():  # values that existed before (loaded) win over the init
                    _local(tensors[name]).copy_(value)
        unset = sorted(name for name, t in fresh.items() if t.is_floating_point() and not _local(t).isfinite().all())
        if unset:
            raise RuntimeError(
                f"init_weights() of {[type(owners[p]).__name__ for p in used]} left {len(unset)} tensors "
                f"uninitialised: {unset[:8]}{' ...' if len(unset) > 8 else ''}")
        if mesh is not None and mesh.size() > 1:
            for t in fresh.values():
                if not isinstance(t, DTensor):  # a replica: make it the same on every rank
                    dist.broadcast(t, group=mesh.get_group(), group_src=0)
    local_bytes = sum(_local(t).numel() * t.element_size() for t in fresh.values())
    full_bytes = sum(t.numel() * t.element_size() for t in fresh.values())
    return Materialised(len(fresh), local_bytes, full_bytes, [p.rstrip(".") or "<root>" for p in used])


def _require_shard_placements(root: nn.Module, names: set[str]) -> None:
    """Per-rank seeds (CPU meshes) are only right for sharded parameters: replicated ones would differ per rank."""
    for name, t in _named_tensors(root):
        if name in names and isinstance(t, DTensor) and not all(isinstance(p, Shard) for p in t.placements):
            raise NotImplementedError(
                f"materialise: {name} has placements {t.placements}; on a CPU mesh only sharded (FSDP) parameters "
                "can be initialised per shard (DTensor has no CPU RNG tracker). Use meta_init=false here.")


def local_parameter_bytes(module: nn.Module) -> int:
    """Bytes of the parameters this rank holds (a DTensor's local shard; a plain tensor whole)."""
    return sum(_local(p).numel() * p.element_size() for p in module.parameters())
