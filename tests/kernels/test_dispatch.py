"""The public ops: PyTorch fallbacks against the same float64 references, backend choice, input errors, and
torch.compile tracing through the Triton custom ops without graph breaks."""

from __future__ import annotations

import pytest
import torch
from einops import rearrange

import kernels
from kernels import reference
from kernels.runtime import use_triton
from tests.kernels.common import DEVICE, check_against_reference, randn

FALLBACK_DTYPES = [torch.float32, torch.float16]


@pytest.mark.parametrize("dtype", FALLBACK_DTYPES)
def test_fallback_attention_with_padding_mask(dtype):
    mask = (torch.rand(3, 45, generator=torch.Generator().manual_seed(7)) > 0.3).to(DEVICE)
    mask[2] = False
    inputs = [randn(3, 2, 20, 32, seed=1), randn(3, 2, 45, 32, seed=2), randn(3, 2, 45, 32, seed=3)]
    check_against_reference(lambda q, k, v: kernels.attention(q, k, v, key_padding_mask=mask, backend="torch"),
                            lambda q, k, v: reference.reference_attention(q, k, v, mask), inputs, dtype)


@pytest.mark.parametrize("dtype", FALLBACK_DTYPES)
def test_fallback_varlen(dtype):
    cu_q = torch.tensor([0, 5, 5, 45, 62], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 33, 45, 45, 95], dtype=torch.int32, device=DEVICE)
    inputs = [randn(62, 2, 32, seed=1), randn(95, 2, 32, seed=2), randn(95, 2, 32, seed=3)]
    check_against_reference(lambda q, k, v: kernels.varlen_attention(q, k, v, cu_q, cu_k, backend="torch"),
                            lambda q, k, v: reference.reference_varlen_attention(q, k, v, cu_q, cu_k), inputs, dtype)


@pytest.mark.parametrize("mode", ["blend", "concat"])
@pytest.mark.parametrize("anchor_frame", [None, 2])
def test_fallback_guided(mode, anchor_frame):
    kw = dict(frame_len=19, weight=0.3, mode=mode, anchor_frame=anchor_frame)
    inputs = [randn(2, 2, 57, 32, seed=s) for s in (1, 2, 3)] + [randn(2, 2, 11, 32, seed=s) for s in (4, 5)]
    check_against_reference(lambda *t: kernels.guided_attention(*t, backend="torch", **kw),
                            lambda *t: reference.reference_guided_attention(*t, **kw), inputs, torch.float32)


@pytest.mark.parametrize("present", [(w, s, t) for w in (0, 1) for s in (0, 1) for t in (0, 1)],
                         ids=lambda p: "".join(n for n, on in zip(("w", "s", "t"), p) if on) or "none")
def test_fallback_rms_norm(present):
    """Every combination of weight, scale and shift (the adaLN path folds the weight into the scale)."""
    optional = [1 + 0.1 * randn(48, seed=2), randn(2, 1, 48, seed=3), randn(2, 1, 48, seed=4)]
    chosen = [t for t, on in zip(optional, present) if on]

    def with_absent(fn):
        def call(x, *given):
            it = iter(given)
            w, s, t = (next(it) if on else None for on in present)
            return fn(x, w, s, t)
        return call

    check_against_reference(with_absent(lambda x, w, s, t: kernels.rms_norm(x, w, scale=s, shift=t, backend="torch")),
                            with_absent(reference.reference_rms_norm), [randn(2, 7, 48, seed=1), *chosen],
                            torch.float32)


def test_cpu_autocast_attention_matches_the_reference():
    """Under CPU autocast the "auto" backend takes `reference.cpu_autocast_attention` (bfloat16 products, float32
    softmax), with q, k, v in the dtypes autocast leaves (here q float32 as after rotary angles, k, v bfloat16): the
    float64 reference's values to bfloat16's precision, keyless rows 0, finite gradients, masked keys unread."""
    torch.manual_seed(0)
    q = torch.randn(2, 3, 10, 16, requires_grad=True)
    k, v = (torch.randn(2, 3, 12, 16).bfloat16().requires_grad_() for _ in range(2))
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, 7:] = False
    mask[1] = False  # no key at all
    expected = reference.reference_attention(q.double(), k.double(), v.double(), mask).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = kernels.attention(q, k, v, key_padding_mask=mask)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), expected, atol=0.03), (out.float() - expected).abs().max()
    assert out[1].abs().max() == 0
    out.float().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert v.grad[0, :, 7:].abs().max() == 0 and v.grad[0, :, :7].abs().max() > 0
    with pytest.raises(ValueError, match="share dtype"):  # outside autocast mixed dtypes are still an error
        kernels.attention(q, k, v)


def test_auto_backend_picks_triton_only_on_cuda():
    cpu = torch.zeros(1)
    assert not use_triton("varlen_attention", "auto", cpu)
    assert not use_triton("varlen_attention", "torch", cpu)
    with pytest.raises(ValueError, match="backend must be one of"):
        use_triton("attention", "cuda", cpu)
    if not kernels.INTERPRETING:  # a CUDA machine: the kernels are compiled, so CPU tensors cannot run them
        with pytest.raises(RuntimeError, match="needs the Triton interpreter"):
            use_triton("varlen_attention", "triton", cpu)
        return
    assert use_triton("varlen_attention", "triton", cpu)  # CPU tensors run through the interpreter
    with pytest.raises(ValueError, match="cannot run these inputs: why"):
        use_triton("attention", "triton", cpu, unsupported="why")


def test_unsupported_inputs_fall_back_or_raise():
    q = randn(1, 1, 8, 16, seed=1).double()
    torch.testing.assert_close(kernels.attention(q, q, q), reference.reference_attention(q, q, q))
    with pytest.raises(ValueError, match="dtype torch.float64"):
        kernels.attention(q, q, q, backend="triton")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="bfloat16 under the Triton interpreter"):
            kernels.attention(*(q.bfloat16() for _ in range(3)), backend="triton")


@pytest.mark.parametrize(("call", "message"), [
    (lambda t: kernels.attention(t[0], t[1][:, :, :, :16], t[2]), "expected q"),
    (lambda t: kernels.attention(t[0], t[1], t[2].half()), "share dtype"),
    (lambda t: kernels.attention(t[0], t[1], t[2], key_padding_mask=torch.ones(2, 9)), "key_padding_mask"),
    (lambda t: kernels.varlen_attention(t[0][0], t[1][0], t[2][0], torch.tensor([0, 3, 8]),
                                        torch.tensor([0, 8])), "same number of samples"),
    (lambda t: kernels.varlen_attention(t[0][0], t[1][0], t[2][0], torch.tensor([0, 9, 8]),
                                        torch.tensor([0, 4, 8])), "rise from 0"),
    (lambda t: kernels.guided_attention(*t, t[1], t[2], frame_len=3), "must divide"),
    (lambda t: kernels.guided_attention(*t, t[1], t[2], frame_len=4, anchor_frame=2), "not a frame index"),
    (lambda t: kernels.guided_attention(*t, t[1], t[2], frame_len=4, mode="sum"), "mode must be"),
    (lambda t: kernels.rms_norm(t[0][0], scale=torch.ones(3, 5)), "does not broadcast"),
])
def test_bad_inputs_name_the_problem(call, message):
    tensors = [torch.zeros(2, 2, 8, 32) for _ in range(3)]
    with pytest.raises(ValueError, match=message):
        call(tensors)


def _compiled_matches_eager(fn, inputs):
    eager_in = [t.clone().requires_grad_() for t in inputs]
    compiled_in = [t.clone().requires_grad_() for t in inputs]
    fn(*eager_in).square().sum().backward()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    compiled(*compiled_in).square().sum().backward()
    for a, b in zip(compiled_in, eager_in):
        torch.testing.assert_close(a.grad, b.grad)


def test_torch_compile_traces_the_custom_ops():
    """fullgraph=True fails on any graph break; aot_eager also traces the registered backward."""
    q, k, v = (randn(1, 2, 20, 32, seed=s) for s in (1, 2, 3))
    mask = torch.arange(20, device=DEVICE)[None] < 15
    _compiled_matches_eager(lambda q, k, v: kernels.attention(q, k, v, key_padding_mask=mask, backend="triton"),
                            [q, k, v])
    cu = torch.tensor([0, 7, 20], dtype=torch.int32, device=DEVICE)
    _compiled_matches_eager(lambda q, k, v: kernels.varlen_attention(q, k, v, cu, cu, max_seqlen_q=13,
                                                                     max_seqlen_k=13, backend="triton"),
                            [rearrange(t, "1 h t d -> t h d") for t in (q, k, v)])
    _compiled_matches_eager(lambda q, k, v: kernels.guided_attention(q, k, v, k[:, :, :5], v[:, :, :5], frame_len=5,
                                                                     anchor_frame=0, backend="triton"), [q, k, v])
    _compiled_matches_eager(lambda x, s: kernels.rms_norm(x, scale=s, backend="triton"),
                            [randn(2, 5, 16, seed=4), randn(2, 1, 16, seed=5)])
