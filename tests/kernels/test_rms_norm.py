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


def test_rms_norm_per_token_shift_fp32():
    """A shift per token ([B, L, C]): each row adds its own shift row (the other variants broadcast the shift over
    the rows, so a wrong row offset into it would go unseen), and its gradient is dy row by row."""
    x = randn(2, 5, 32, seed=1)
    tensors = [x, 1 + 0.1 * randn(32, seed=2), 0.5 * randn(2, 1, 32, seed=3), randn(2, 5, 32, seed=4)]
    check_against_reference(lambda *t: kernels.rms_norm(t[0], t[1], scale=t[2], shift=t[3], backend="triton"),
                            lambda *t: reference_rms_norm(*t), tensors, torch.float32)


@pytest.mark.parametrize("layout", ["transposed", "every-other-column"])
def test_rms_norm_of_a_non_contiguous_x(layout):
    """x whose channels are not contiguous (a transposed view: channel stride L, row stride 1; or every other
    column: channel stride 2): the kernels read rows as contiguous, so the op must copy such an x first, in the
    forward and in the backward (which gets the saved, still strided, x)."""
    if layout == "transposed":
        x = randn(2, 32, 6, seed=1).transpose(1, 2)  # [2, 6, 32], strides (192, 1, 6)
    else:
        x = randn(2, 6, 64, seed=1)[..., ::2]  # [2, 6, 32], strides (384, 64, 2)
    assert x.stride(-1) != 1
    weight, scale, shift = 1 + 0.1 * randn(32, seed=2), 0.5 * randn(2, 1, 32, seed=3), randn(2, 1, 32, seed=4)
    check_against_reference(lambda *t: kernels.rms_norm(t[0], t[1], scale=t[2], shift=t[3], backend="triton"),
                            lambda *t: reference_rms_norm(*t), [x, weight, scale, shift], torch.float32)


def test_rms_norm_backward_gives_empty_gradients_for_absent_inputs():
    """rms_norm_bwd's contract, which its fake (the shapes torch.compile plans with) states: an absent weight,
    scale or shift gets an empty gradient; the real op must return the same shapes as the fake."""
    from kernels import norms

    x, dy = randn(2, 3, 16, seed=1), randn(2, 3, 16, seed=2)
    _, rstd = norms.rms_norm_fwd(x, None, None, None, 1e-6)
    real = norms.rms_norm_bwd(dy, x, None, None, None, rstd)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = norms.rms_norm_bwd(*(mode.from_tensor(t) for t in (dy, x)), None, None, None, mode.from_tensor(rstd))
    assert [tuple(t.shape) for t in real] == [tuple(t.shape) for t in fake] == [(2, 3, 16), (0,), (0,), (0,)]
    expected_dx = torch.func.vjp(reference_rms_norm, x.double())[1](dy.double())[0]
    torch.testing.assert_close(real[0].double(), expected_dx, atol=2e-5, rtol=2e-5)
