"""Shared pieces of the kernel tests: device, dtypes, tolerances, and the forward + gradient comparison.

Every check runs the op on inputs rounded to the tested dtype and a float64 reference on the same rounded
values, then compares the output and the gradient of every input for one random output cotangent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
GPU = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]

#: fp32 and fp16 everywhere (interpreter on CPU); bf16 only on CUDA (the interpreter's bf16 tl.dot is wrong).
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=GPU)]


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """assert_close bounds |a − b| ≤ atol + rtol·|b| against the float64 reference.

    fp32 under the interpreter is exact fp32 (errors ~5e-7); on a GPU tl.dot rounds fp32 to TF32 (10-bit
    mantissa, like fp16). fp16: P and dS are rounded to fp16 before their matmuls (~1e-3). bf16: 8-bit
    mantissa (ulp 7.8e-3).
    """
    if dtype == torch.float32:
        return dict(atol=2e-5, rtol=2e-5) if not CUDA else dict(atol=1e-2, rtol=1e-2)
    if dtype == torch.float16:
        return dict(atol=5e-3, rtol=5e-3)
    return dict(atol=4e-2, rtol=4e-2)


def check_against_reference(op: Callable[..., torch.Tensor], reference: Callable[..., torch.Tensor],
                            inputs: Sequence[torch.Tensor], dtype: torch.dtype, *, grad: bool = True,
                            seed: int = 0) -> None:
    """op(inputs in dtype) matches reference(same values in float64): output, and every input's gradient."""
    rounded = [t.to(DEVICE, dtype) for t in inputs]
    ref_in = [t.double().requires_grad_(grad) for t in rounded]
    expected = reference(*ref_in)
    got_in = [t.clone().requires_grad_(grad) for t in rounded]
    got = op(*got_in)
    assert got.dtype == dtype and got.shape == expected.shape
    tol = tolerance(dtype)
    torch.testing.assert_close(got.double(), expected.detach(), **tol, msg=lambda m: f"output: {m}")
    if not grad:
        return
    cotangent = torch.randn(expected.shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)
    expected.backward(cotangent.double())
    got.backward(cotangent)
    for i, (g, e) in enumerate(zip(got_in, ref_in)):
        assert g.grad is not None and g.grad.dtype == dtype, f"input {i}: no gradient in {dtype}"
        torch.testing.assert_close(g.grad.double(), e.grad, **tol, msg=lambda m, i=i: f"grad of input {i}: {m}")


def randn(*shape: int, seed: int) -> torch.Tensor:
    """Standard normal float32 on DEVICE from a fixed seed."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
