"""Triton kernels for video transformers, with PyTorch fallbacks.

Public ops (``backend="auto"``: on CUDA, PyTorch SDPA for dense attention and the Triton kernels for what SDPA
lacks; PyTorch elsewhere; see ``kernels.ops`` and ``kernels.runtime.AUTO_ON_CUDA``):

- ``attention``: batched softmax attention, optional key padding mask, any Lq / Lk (Triton with
  ``backend="triton"``);
- ``varlen_attention``: packed samples with separate query / key cumulative lengths;
- ``guided_attention``: AVID middle-frame guidance (blend or concat) over frame-major video tokens;
- ``rms_norm``: RMSNorm with optional adaLN modulation ``norm(x)·(1 + scale) + shift``.

All have forward and backward kernels. The Triton interpreter (CPU tests) needs ``TRITON_INTERPRET=1`` in the
environment before this package is imported.
"""

from kernels.ops import attention, guided_attention, rms_norm, varlen_attention
from kernels.runtime import AUTO_ON_CUDA, INTERPRETING, Backend, resolve_backend

__all__ = ["AUTO_ON_CUDA", "INTERPRETING", "Backend", "attention", "guided_attention", "resolve_backend", "rms_norm",
           "varlen_attention"]
