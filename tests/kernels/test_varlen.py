"""Packed variable-length attention (Triton) against the float64 block-diagonal definition."""

from __future__ import annotations

import pytest
import torch
from einops import rearrange

import kernels
from kernels.reference import reference_varlen_attention
from tests.kernels.common import DEVICE, DTYPES, check_against_reference, randn, tolerance

PACKS = {  # (query lengths, key lengths, heads, head dim)
    # cross-attention: an empty query sequence, a sample with no keys (its queries output 0), odd lengths
    "cross-with-empties": ([5, 0, 40, 17], [33, 12, 0, 50], 2, 32),
    # self-attention: one token, lengths below, at and above the 32-query block
    "self": ([1, 31, 16, 66], [1, 31, 16, 66], 2, 64),
}


def offsets(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pack", PACKS.values(), ids=PACKS.keys())
def test_varlen_matches_reference(pack, dtype):
    lq, lk, h, d = pack
    cu_q, cu_k = offsets(lq), offsets(lk)
    inputs = [randn(sum(lq), h, d, seed=1), randn(sum(lk), h, d, seed=2), randn(sum(lk), h, d, seed=3)]
    check_against_reference(lambda q, k, v: kernels.varlen_attention(q, k, v, cu_q, cu_k, backend="triton"),
                            lambda q, k, v: reference_varlen_attention(q, k, v, cu_q, cu_k), inputs, dtype)


def test_varlen_equals_batched_attention_per_sample():
    """Packing changes nothing: each sample's rows equal kernels.attention run on that sample alone."""
    lq, lk = [9, 23], [14, 5]
    cu_q, cu_k = offsets(lq), offsets(lk)
    q, k, v = randn(sum(lq), 2, 32, seed=1), randn(sum(lk), 2, 32, seed=2), randn(sum(lk), 2, 32, seed=3)
    packed = kernels.varlen_attention(q, k, v, cu_q, cu_k, max_seqlen_q=23, max_seqlen_k=14, backend="triton")
    for i in range(2):
        rows_q, rows_k = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        alone = kernels.attention(*(rearrange(t[rows], "t h d -> 1 h t d") for t, rows in
                                    ((q, rows_q), (k, rows_k), (v, rows_k))), backend="triton")
        torch.testing.assert_close(packed[rows_q], rearrange(alone, "1 h t d -> t h d"), **tolerance(torch.float32))
