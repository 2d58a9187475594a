"""lightning_modules.nn.attention: the module models use, on the Triton path and on the PyTorch path."""

from __future__ import annotations

import pytest
import torch

from kernels.reference import reference_attention
from lightning_modules.nn.attention import Attention, FrameGuidance, attend
from tests.kernels.common import DEVICE, randn, tolerance

TOL = tolerance(torch.float32)  # exact fp32 under the interpreter, TF32 matmuls on a GPU


def _pair(**kw) -> tuple[Attention, Attention]:
    """Two identical modules, one per backend."""
    torch.manual_seed(0)
    triton_mod = Attention(64, 2, backend="triton", **kw).to(DEVICE)
    torch_mod = Attention(64, 2, backend="torch", **kw).to(DEVICE)
    torch_mod.load_state_dict(triton_mod.state_dict())
    return triton_mod, torch_mod


def _assert_same(triton_mod, torch_mod, *args, **kwargs):
    """Forward and parameter gradients of the two backends agree."""
    out_a, out_b = triton_mod(*args, **kwargs), torch_mod(*args, **kwargs)
    torch.testing.assert_close(out_a, out_b, **TOL)
    out_a.square().sum().backward()
    out_b.square().sum().backward()
    for (name, pa), pb in zip(triton_mod.named_parameters(), torch_mod.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, **TOL, msg=lambda m, n=name: f"{n}: {m}")


def test_self_attention_with_qk_norm_backends_agree():
    _assert_same(*_pair(qk_norm=True), randn(2, 21, 64, seed=1))


def test_cross_attention_with_text_padding_backends_agree():
    mask = torch.tensor([[True] * 9 + [False] * 3, [True] * 12], device=DEVICE)
    _assert_same(*_pair(context_dim=48), randn(2, 17, 64, seed=1), randn(2, 12, 48, seed=2),
                 key_padding_mask=mask)


def test_packed_equals_one_sample_at_a_time():
    """Two samples of different lengths packed with cu_seqlens give what each gives alone."""
    mod, _ = _pair(context_dim=48)
    x, text = randn(11 + 6, 64, seed=1), randn(4 + 9, 48, seed=2)
    cu_x = torch.tensor([0, 11, 17], dtype=torch.int32, device=DEVICE)
    cu_t = torch.tensor([0, 4, 13], dtype=torch.int32, device=DEVICE)
    packed = mod(x, text, cu_seqlens=cu_x, cu_seqlens_context=cu_t)
    torch.testing.assert_close(packed[:11], mod(x[None, :11], text[None, :4])[0], **TOL)
    torch.testing.assert_close(packed[11:], mod(x[None, 11:], text[None, 4:])[0], **TOL)


@pytest.mark.parametrize("mode", ["blend", "concat"])
def test_frame_guidance_with_cached_anchor_backends_agree(mode):
    triton_mod, torch_mod = _pair()
    frames, frame_len = 3, 10
    x, anchor_tokens = randn(1, frames * frame_len, 64, seed=1), randn(1, frame_len, 64, seed=2)
    guidance = [FrameGuidance(frame_len, 0.4, mode, anchor_kv=m.project_kv(anchor_tokens))
                for m in (triton_mod, torch_mod)]
    out_a, out_b = triton_mod(x, guidance=guidance[0]), torch_mod(x, guidance=guidance[1])
    torch.testing.assert_close(out_a, out_b, **TOL)


def test_in_clip_anchor_with_zero_weight_is_per_frame_attention():
    """ω = 0: each frame attends to itself only, as a block-diagonal mask says."""
    q, k, v = (randn(1, 2, 24, 32, seed=s) for s in (1, 2, 3))
    frame = torch.arange(24, device=DEVICE) // 8
    out = attend(q, k, v, guidance=FrameGuidance(8, weight=0.0, anchor_frame=1), backend="triton")
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=frame[:, None] == frame[None])
    torch.testing.assert_close(out, expected, **TOL)
    torch.testing.assert_close(attend(q, k, v, backend="triton"), reference_attention(q, k, v), **TOL)
