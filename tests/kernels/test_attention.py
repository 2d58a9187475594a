"""Batched flash attention (Triton) against the float64 definition: forward, dq, dk, dv.

Under the interpreter the blocks are BLOCK_M = 32 and BLOCK_N = 16 (dK/dV: 32 keys × 16 queries), so the
lengths below cover several tiles with a ragged tail, a sequence shorter than one block, and Lq ≠ Lk.
"""

from __future__ import annotations

import pytest
import torch
from einops import rearrange

import kernels
from kernels.reference import reference_attention
from tests.kernels.common import DEVICE, DTYPES, check_against_reference, randn

SHAPES = {  # (B, H, Lq, Lk, D)
    "odd-self": (2, 2, 37, 37, 32),
    "shorter-than-block": (1, 2, 7, 5, 64),
    "cross-long-queries": (2, 1, 70, 23, 32),
    "cross-long-keys-d24": (1, 1, 19, 45, 24),  # head dim padded to a 32-wide tile
}


def triton_attention(**kw):
    return lambda q, k, v: kernels.attention(q, k, v, backend="triton", **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_attention_matches_reference(shape, dtype):
    b, h, lq, lk, d = shape
    inputs = [randn(b, h, lq, d, seed=1), randn(b, h, lk, d, seed=2), randn(b, h, lk, d, seed=3)]
    check_against_reference(triton_attention(), reference_attention, inputs, dtype)


def test_head_dim_128():
    inputs = [randn(1, 1, 33, 128, seed=1), randn(1, 1, 20, 128, seed=2), randn(1, 1, 20, 128, seed=3)]
    check_against_reference(triton_attention(), reference_attention, inputs, torch.float16)


def test_custom_scale():
    inputs = [randn(1, 2, 21, 32, seed=4), randn(1, 2, 21, 32, seed=5), randn(1, 2, 21, 32, seed=6)]
    check_against_reference(triton_attention(scale=0.3), lambda q, k, v: reference_attention(q, k, v, scale=0.3),
                            inputs, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_key_padding_mask(dtype):
    """Text-style padding: random keys dropped, one sample with no key at all (its output and grads are 0)."""
    b, h, lq, lk, d = 3, 2, 20, 45, 32
    mask = torch.rand(b, lk, generator=torch.Generator().manual_seed(7)) > 0.3
    mask[1, 30:] = False  # a padded tail
    mask[2] = False
    mask = mask.to(DEVICE)
    inputs = [randn(b, h, lq, d, seed=1), randn(b, h, lk, d, seed=2), randn(b, h, lk, d, seed=3)]
    check_against_reference(triton_attention(key_padding_mask=mask),
                            lambda q, k, v: reference_attention(q, k, v, mask), inputs, dtype)
    out = kernels.attention(*(t.to(dtype) for t in inputs), key_padding_mask=mask, backend="triton")
    assert out[2].abs().max() == 0


def test_key_padding_mask_shorter_than_block():
    mask = torch.tensor([[True, False, True, True, False, False, True, True, True]], device=DEVICE)
    inputs = [randn(1, 1, 5, 32, seed=1), randn(1, 1, 9, 32, seed=2), randn(1, 1, 9, 32, seed=3)]
    check_against_reference(triton_attention(key_padding_mask=mask),
                            lambda q, k, v: reference_attention(q, k, v, mask), inputs, torch.float32)


def test_strided_inputs_from_fused_projection():
    """q, k, v as views [B, H, L, D] of one [B, L, 3, H, D] projection: the kernels take strides, no copy."""
    qkv = randn(2, 29, 3 * 2 * 32, seed=8)

    def split(t):
        return rearrange(t, "b l (three h d) -> three b h l d", three=3, h=2).unbind(0)

    check_against_reference(lambda t: kernels.attention(*split(t), backend="triton"),
                            lambda t: reference_attention(*split(t)), [qkv], torch.float32)
