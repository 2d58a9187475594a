"""Where the Triton kernels can run, and how a public op picks its backend.

Triton decides at decoration time (when a kernel module is imported) whether ``@triton.jit`` functions are
compiled for a GPU or emulated on the CPU by the interpreter (``TRITON_INTERPRET=1``). ``INTERPRETING``
records that decision, so it must be read here, at import, not later from the environment.
"""

from __future__ import annotations

import os
from typing import Literal

import torch
import triton

Backend = Literal["auto", "triton", "torch"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")

#: True when the kernels were decorated under the Triton interpreter (CPU emulation, used by the tests).
INTERPRETING: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(backend: Backend, *tensors: torch.Tensor, unsupported: str | None = None) -> bool:
    """Whether an op runs its Triton kernel (True) or its PyTorch fallback (False).

    ``auto``: Triton when every tensor is on CUDA and the kernel supports the inputs (``unsupported`` is None,
    else it names why not). ``torch``: always the fallback. ``triton``: always the kernel; on CPU this needs the
    interpreter, and unsupported inputs raise.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto":
        return on_cuda and unsupported is None and not INTERPRETING
    if not on_cuda and not INTERPRETING:
        raise RuntimeError(
            "backend='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 before "
            "the kernels package is imported"
        )
    if unsupported is not None:
        raise ValueError(f"backend='triton' cannot run these inputs: {unsupported}")
    return True


def configs(gpu: list[triton.Config], interpreter: triton.Config) -> list[triton.Config]:
    """Autotuning space: several configs on a GPU, exactly one under the interpreter.

    With more than one config the autotuner benchmarks through the GPU driver, which does not exist when
    interpreting ("0 active drivers").
    """
    return [interpreter] if INTERPRETING else gpu


def cfg(num_warps: int = 4, num_stages: int = 2, **blocks: int) -> triton.Config:
    """Shorthand for ``triton.Config(blocks, num_warps=..., num_stages=...)``."""
    return triton.Config(dict(blocks), num_warps=num_warps, num_stages=num_stages)
