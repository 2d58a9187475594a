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

#: What ``backend="auto"`` runs on CUDA, per public op. Dense attention goes to PyTorch SDPA (cuDNN / flash
#: attention; DESIGN principle 4) until a GPU benchmark (experiments/benchmarks/attention.py) shows our dense
#: kernel faster; a model picks it with ``backend="triton"`` (e.g. ``DiT(attention_backend="triton")``). The
#: Triton kernels serve what SDPA lacks: packed sequences without padding and AVID's guided attention (SDPA
#: runs them as a loop of calls or over frames as a batch), and the fused RMSNorm + adaLN.
AUTO_ON_CUDA: dict[str, str] = {
    "attention": "torch",
    "varlen_attention": "triton",
    "guided_attention": "triton",
    "rms_norm": "triton",
}


def resolve_backend(op: str, backend: Backend, *, on_cuda: bool, unsupported: str | None = None,
                    interpreting: bool = INTERPRETING) -> str:
    """"triton" or "torch": what public op ``op`` runs with ``backend`` for inputs on CUDA or not.

    ``auto``: ``AUTO_ON_CUDA[op]`` when every input is on CUDA and the kernel supports them (``unsupported`` is
    None, else it names why not); PyTorch otherwise. ``torch``: always PyTorch (SDPA for attention).
    ``triton``: always the kernel; on CPU this needs the interpreter, and unsupported inputs raise.
    ``interpreting``: whether the kernels run in the Triton interpreter (then ``auto`` never picks them: they
    would be emulated, slowly, even on a GPU machine).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if op not in AUTO_ON_CUDA:
        raise ValueError(f"unknown op {op!r}; known: {sorted(AUTO_ON_CUDA)}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        use_kernel = on_cuda and unsupported is None and not interpreting and AUTO_ON_CUDA[op] == "triton"
        return "triton" if use_kernel else "torch"
    if not on_cuda and not interpreting:
        raise RuntimeError(
            "backend='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 before "
            "the kernels package is imported"
        )
    if unsupported is not None:
        raise ValueError(f"backend='triton' cannot run these inputs: {unsupported}")
    return "triton"


def use_triton(op: str, backend: Backend, *tensors: torch.Tensor, unsupported: str | None = None) -> bool:
    """Whether public op ``op`` runs its Triton kernel (True) or its PyTorch fallback (False) on ``tensors``
    (see ``resolve_backend``)."""
    on_cuda = all(t.is_cuda for t in tensors)
    return resolve_backend(op, backend, on_cuda=on_cuda, unsupported=unsupported) == "triton"


def configs(gpu: list[triton.Config], interpreter: triton.Config) -> list[triton.Config]:
    """Autotuning space: several configs on a GPU, exactly one under the interpreter.

    With more than one config the autotuner benchmarks through the GPU driver, which does not exist when
    interpreting ("0 active drivers").
    """
    return [interpreter] if INTERPRETING else gpu


def cfg(num_warps: int = 4, num_stages: int = 2, **blocks: int) -> triton.Config:
    """Shorthand for ``triton.Config(blocks, num_warps=..., num_stages=...)``."""
    return triton.Config(dict(blocks), num_warps=num_warps, num_stages=num_stages)
