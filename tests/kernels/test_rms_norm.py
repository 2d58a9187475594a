"""Fused RMSNorm + adaLN modulation (Triton) against the float64 formula: y, dx, dweight, dscale, dshift.

The norm has no tl.dot, so bf16 runs under the interpreter too (loads/stores and fp32 math only).
"""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels.reference import reference_rms_norm
from tests.kernels.common import GPU, check_against_reference, randn

VARIANTS = {  # x shape, weight?, scale shape, shift shape
    "adaln-per-sample": ((2, 7, 48), True, (2, 1, 48), (2, 1, 48)),  # DiT: [B, 1, C] modulation
    "per-token-scale-global-shift": ((2, 5, 64), False, (2, 5, 64), (64,)),
    "2d-weight-only": ((9, 40), True, None, None),
    "plain-shift-only": ((3, 6, 32), False, None, (3, 1, 32)),
}
NORM_DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16)]


def _inputs(variant):
    x_shape, has_weight, scale_shape, shift_shape = variant
    tensors = {"x": randn(*x_shape, seed=1)}
    if has_weight:
        tensors["weight"] = 1 + 0.1 * randn(x_shape[-1], seed=2)
    if scale_shape:
        tensors["scale"] = 0.5 * randn(*scale_shape, seed=3)
    if shift_shape:
        tensors["shift"] = randn(*shift_shape, seed=4)
    return tensors


@pytest.mark.parametrize("dtype", NORM_DTYPES)
@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_rms_norm_matches_reference(variant, dtype):
    tensors = _inputs(variant)
    names = list(tensors)

    def call(fn, **kw):
        return lambda *ts: fn(**dict(zip(names, ts)), eps=1e-6, **kw)

    check_against_reference(call(kernels.rms_norm, backend="triton"), call(reference_rms_norm),
                            list(tensors.values()), dtype)


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, marks=GPU)])
def test_rms_norm_gpu_bf16_large_rows(dtype):
    """Movie Gen width (C = 6144, padded to an 8192 tile) in bf16 on the GPU."""
    x = randn(2, 33, 6144, seed=1)
    scale, shift = 0.5 * randn(2, 1, 6144, seed=2), randn(2, 1, 6144, seed=3)
    weight = 1 + 0.1 * randn(6144, seed=4)
    check_against_reference(lambda *t: kernels.rms_norm(t[0], t[1], scale=t[2], shift=t[3], backend="triton"),
                            lambda *t: reference_rms_norm(*t), [x, weight, scale, shift], dtype)
