"""AVID middle-frame guided attention (Triton) against the float64 dense-mask definition.

Frames of 19 tokens (shorter than the 32-query block, not a multiple of the 16-key block) and of 40 tokens
(two query tiles); an external anchor (cached from another segment, its own length) and an in-clip anchor
passed as a view of k, v (gradients flow back into k, v through the view).
"""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels.reference import reference_guided_attention
from tests.kernels.common import DTYPES, check_against_reference, randn, tolerance


def guided(mode: str, frame_len: int, weight: float, anchor_frame: int | None, in_clip: bool):
    """(op, reference) taking q, k, v (+ k_a, v_a for an external anchor)."""
    rows = slice(None) if anchor_frame is None else slice(anchor_frame * frame_len, (anchor_frame + 1) * frame_len)

    def wrap(fn, **kw):
        def call(q, k, v, *anchor):
            k_a, v_a = (k[:, :, rows], v[:, :, rows]) if in_clip else anchor
            return fn(q, k, v, k_a, v_a, frame_len=frame_len, weight=weight, mode=mode, anchor_frame=anchor_frame,
                      **kw)
        return call

    return wrap(kernels.guided_attention, backend="triton"), wrap(reference_guided_attention)


CASES = {  # (B, H, frames, frame_len, anchor_len, weight, anchor_frame, in_clip)
    "external-anchor": (1, 2, 3, 19, 23, 0.3, None, False),
    "in-clip-anchor": (1, 2, 3, 19, 19, 0.3, 1, True),
    "two-tiles-per-frame": (2, 1, 2, 40, 9, 0.8, None, False),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["blend", "concat"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_guided_matches_reference(case, mode, dtype):
    b, h, frames, frame_len, anchor_len, weight, anchor_frame, in_clip = case
    op, ref = guided(mode, frame_len, weight, anchor_frame, in_clip)
    inputs = [randn(b, h, frames * frame_len, 32, seed=s) for s in (1, 2, 3)]
    if not in_clip:
        inputs += [randn(b, h, anchor_len, 32, seed=s) for s in (4, 5)]
    check_against_reference(op, ref, inputs, dtype)


@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_blend_weight_extremes(weight):
    """ω = 0 is plain per-frame attention (no anchor gradient); ω = 1 is attention to the anchor alone."""
    op, ref = guided("blend", 16, weight, None, False)
    inputs = [randn(1, 1, 48, 32, seed=s) for s in (1, 2, 3)] + [randn(1, 1, 16, 32, seed=s) for s in (4, 5)]
    check_against_reference(op, ref, inputs, torch.float32)


def test_blend_without_grad_skips_saving_and_matches():
    """Inference (AVID's use) runs without saving the anchor output; the result is the same."""
    op, _ = guided("blend", 19, 0.3, None, False)
    inputs = [randn(1, 2, 38, 32, seed=s) for s in (1, 2, 3)] + [randn(1, 2, 7, 32, seed=s) for s in (4, 5)]
    with torch.no_grad():
        no_grad = op(*inputs)
    with_grad = op(*(t.clone().requires_grad_() for t in inputs))
    torch.testing.assert_close(no_grad, with_grad.detach(), **tolerance(torch.float32))
