"""Which backend each op runs (dense attention: PyTorch SDPA unless a model asks for Triton; packed, guided and
norm: Triton on CUDA), that the choice reaches every attention layer of a model from its config argument, and
that the two dense paths agree (forward and gradients) through a whole DiT."""

from __future__ import annotations

import pytest
import torch

import kernels
import kernels.ops
import kernels.reference
from kernels.runtime import AUTO_ON_CUDA, resolve_backend
from lightning_modules.nn.attention import Attention
from lightning_modules.nn.dit import DiT
from tests.kernels.common import DEVICE, randn, tolerance

OPS = ("attention", "varlen_attention", "guided_attention", "rms_norm")


def test_auto_routes_dense_attention_to_sdpa_and_the_rest_to_triton_on_cuda():
    on_gpu = {op: resolve_backend(op, "auto", on_cuda=True, interpreting=False) for op in OPS}
    assert on_gpu == {"attention": "torch", "varlen_attention": "triton", "guided_attention": "triton",
                      "rms_norm": "triton"} == AUTO_ON_CUDA
    for op in OPS:
        assert resolve_backend(op, "auto", on_cuda=False, interpreting=False) == "torch"
        assert resolve_backend(op, "auto", on_cuda=True, interpreting=True) == "torch"  # never emulate by default
        assert resolve_backend(op, "auto", on_cuda=True, unsupported="head dim 512", interpreting=False) == "torch"
        assert resolve_backend(op, "torch", on_cuda=True, interpreting=False) == "torch"
        assert resolve_backend(op, "triton", on_cuda=True, interpreting=False) == "triton"
        with pytest.raises(RuntimeError, match="needs the Triton interpreter"):
            resolve_backend(op, "triton", on_cuda=False, interpreting=False)
        with pytest.raises(ValueError, match="cannot run these inputs: head dim 512"):
            resolve_backend(op, "triton", on_cuda=True, unsupported="head dim 512", interpreting=False)
    with pytest.raises(ValueError, match="unknown op 'flash'"):
        resolve_backend("flash", "auto", on_cuda=True)


def test_dense_auto_never_calls_the_triton_kernel(monkeypatch: pytest.MonkeyPatch):
    q, k, v = (randn(2, 2, 16, 32, seed=s) for s in (1, 2, 3))
    expected = kernels.attention(q, k, v, backend="torch")

    def refuse(*args, **kwargs):
        raise AssertionError("backend='auto' ran the Triton dense kernel")

    monkeypatch.setattr(kernels.ops, "flash_attn_fwd", refuse)
    torch.testing.assert_close(kernels.attention(q, k, v), expected, rtol=0, atol=0)
    with pytest.raises(AssertionError, match="ran the Triton dense kernel"):
        kernels.attention(q, k, v, backend="triton")


DIT = dict(in_channels=4, dim=32, depth=2, heads=2, ffn_dim=64, max_t=2, max_h=4, max_w=4, qk_norm=True)


def _dit_inputs() -> tuple[torch.Tensor, ...]:
    mask = torch.tensor([[True] * 5 + [False] * 2, [True] * 7], device=DEVICE)
    return randn(2, 4, 2, 4, 4, seed=1), torch.rand(2, generator=torch.Generator().manual_seed(2)).to(DEVICE), \
        randn(2, 7, 32, seed=3), mask


def test_the_model_config_choice_reaches_every_attention_layer_and_both_paths_agree():
    torch.manual_seed(0)
    auto = DiT(**DIT).to(DEVICE)
    for p in auto.parameters():  # give adaLN-Zero's zero layers values, so every path carries signal
        if torch.count_nonzero(p) == 0:
            torch.nn.init.normal_(p, std=0.1)
    triton = DiT(**DIT, attention_backend="triton").to(DEVICE)
    triton.load_state_dict(auto.state_dict())
    layers = [m for m in triton.modules() if isinstance(m, Attention)]
    assert len(layers) == 2 * DIT["depth"] and all(m.backend == "triton" for m in layers)
    assert all(m.backend == "auto" for m in auto.modules() if isinstance(m, Attention))

    x, t, context, mask = _dit_inputs()
    out_auto, out_triton = auto(x, t, context, mask), triton(x, t, context, mask)
    tol = tolerance(torch.float32)
    torch.testing.assert_close(out_triton, out_auto, **tol)
    out_auto.square().mean().backward()
    out_triton.square().mean().backward()
    for (name, a), b in zip(auto.named_parameters(), triton.parameters()):
        torch.testing.assert_close(b.grad, a.grad, **tol, msg=lambda m, n=name: f"{n}: {m}")



@pytest.mark.parametrize("mode", ["blend", "concat"])
@pytest.mark.parametrize("anchor_frame", [None, 1])
def test_guided_sdpa_fallback_makes_only_4d_maskless_calls(monkeypatch: pytest.MonkeyPatch, mode, anchor_frame):
    """On CUDA SDPA's flash and cuDNN backends take 4-D inputs without an arbitrary mask; a 5-D layout or a boolean
    mask sends them to the math backend (the benchmark's guided SDPA baseline used to be both)."""
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, **kwargs):
        calls.append((q.dim(), k.dim(), attn_mask is None))
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(kernels.reference.F, "scaled_dot_product_attention", recording)
    q, k, v = (randn(2, 2, 48, 32, seed=s) for s in (1, 2, 3))
    ka, va = randn(2, 2, 16, 32, seed=4), randn(2, 2, 16, 32, seed=5)
    out = kernels.guided_attention(q, k, v, ka, va, frame_len=16, mode=mode, anchor_frame=anchor_frame,
                                   backend="torch")
    expected = kernels.reference.reference_guided_attention(
        *(t.double() for t in (q, k, v, ka, va)), 16, 0.4, mode, anchor_frame)
    torch.testing.assert_close(out.double(), expected, **tolerance(torch.float32))
    assert calls and all(c == (4, 4, True) for c in calls), calls


def test_packed_sdpa_fallback_makes_only_4d_calls(monkeypatch: pytest.MonkeyPatch):
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, **kwargs):
        calls.append((q.dim(), k.dim(), attn_mask is None))
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(kernels.reference.F, "scaled_dot_product_attention", recording)
    cu_q = torch.tensor([0, 5, 5, 21], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 9, 12, 12], dtype=torch.int32, device=DEVICE)
    q, k, v = randn(21, 2, 16, seed=1), randn(12, 2, 16, seed=2), randn(12, 2, 16, seed=3)
    out = kernels.varlen_attention(q, k, v, cu_q, cu_k, backend="torch")
    expected = kernels.reference.reference_varlen_attention(*(t.double() for t in (q, k, v)), cu_q, cu_k)
    torch.testing.assert_close(out.double(), expected, **tolerance(torch.float32))
    assert calls and all(c == (4, 4, True) for c in calls), calls
