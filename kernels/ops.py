"""Public ops: check the inputs, then run the Triton kernel (CUDA) or the PyTorch fallback (elsewhere).

Every op takes ``backend``: ``"auto"`` (on CUDA: PyTorch SDPA for dense ``attention``, the Triton kernel for
the packed, guided and norm ops when it supports the inputs; PyTorch elsewhere; see ``runtime.AUTO_ON_CUDA``),
``"torch"`` (always PyTorch: SDPA for attention) or ``"triton"`` (always the kernel; on CPU only under
``TRITON_INTERPRET=1``, which the tests use). The Triton paths are torch custom ops (``torch.ops.mglab.*``) with registered autograd,
so ``torch.compile`` traces through them without a graph break.
"""

from __future__ import annotations

import math

import torch

from kernels import reference
from kernels.flash_attention import flash_attn_fwd
from kernels.guidance import guided_attn_fwd
from kernels.norms import rms_norm_fwd
from kernels.runtime import INTERPRETING, Backend, use_triton

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
MAX_NORM_DIM = 32768
GUIDANCE_MODES = ("blend", "concat")


def _check_same(name: str, tensors: dict[str, torch.Tensor]) -> None:
    dtypes = {t.dtype for t in tensors.values()}
    devices = {t.device for t in tensors.values()}
    if len(dtypes) > 1 or len(devices) > 1:
        found = ", ".join(f"{k}: {t.dtype} on {t.device}" for k, t in tensors.items())
        raise ValueError(f"{name}: inputs must share dtype and device, got {found}")


def _attention_unsupported(q: torch.Tensor) -> str | None:
    """Why the Triton attention kernels cannot take q's dtype / head dim, or None."""
    if q.dtype not in _KERNEL_DTYPES:
        return f"dtype {q.dtype} (kernels take float16, bfloat16, float32)"
    if INTERPRETING and q.dtype == torch.bfloat16:
        return "bfloat16 under the Triton interpreter (its bf16 tl.dot is wrong); use float16 or float32"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}"
    return None


def _scale(scale: float | None, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, key_padding_mask: torch.Tensor | None = None,
              scale: float | None = None, backend: Backend = "auto") -> torch.Tensor:
    """softmax(scale·Q·Kᵀ)·V over batched heads (non-causal), SDPA layout.

    backend "auto" runs PyTorch SDPA (cuDNN / flash attention on GPU), or under CPU autocast
    `reference.cpu_autocast_attention` (where q, k, v may differ in dtype, as autocast leaves them); "triton" our
    kernel (see the module docstring).

    q: [B, H, Lq, D]; k, v: [B, H, Lk, D] (Lq ≠ Lk for cross-attention); key_padding_mask: bool [B, Lk],
    True = attend (text padding). scale defaults to 1/sqrt(D). Queries with no allowed key output 0.
    """
    cpu_autocast = backend == "auto" and q.device.type == "cpu" and torch.is_autocast_enabled("cpu")
    if not cpu_autocast:
        _check_same("attention", {"q": q, "k": k, "v": v})
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention: expected q [B, H, Lq, D] and k, v [B, H, Lk, D], got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool
                                         or key_padding_mask.shape != (k.shape[0], k.shape[2])):
        raise ValueError(f"attention: key_padding_mask must be bool [B, Lk] = {[k.shape[0], k.shape[2]]}, got "
                         f"{key_padding_mask.dtype} {list(key_padding_mask.shape)}")
    tau = _scale(scale, q.shape[-1])
    if cpu_autocast:
        return reference.cpu_autocast_attention(q, k, v, key_padding_mask, tau)
    if use_triton("attention", backend, q, k, v, unsupported=_attention_unsupported(q)):
        return flash_attn_fwd(q, k, v, key_padding_mask, None, None, 0, 0, tau)[0]
    return reference.sdpa_attention(q, k, v, key_padding_mask, tau)


def _max_seqlen(cu_seqlens: torch.Tensor, total: int, name: str) -> int:
    """Longest sequence in a pack (one device sync), checking that cu_seqlens describes ``total`` tokens."""
    lengths = cu_seqlens.diff()
    first, last, shortest, longest = torch.stack([cu_seqlens[0], cu_seqlens[-1], lengths.min(), lengths.max()]).tolist()
    if first != 0 or last != total or shortest < 0:
        raise ValueError(f"varlen_attention: {name} must rise from 0 to the number of packed tokens ({total}), got "
                         f"{cu_seqlens.tolist()}")
    return int(longest)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, *, max_seqlen_q: int | None = None, max_seqlen_k: int | None = None,
                     scale: float | None = None, backend: Backend = "auto") -> torch.Tensor:
    """Attention within each sample of a packed batch (FlashAttention varlen layout), no padding.

    q: [Tq, H, D] = the queries of all samples back to back; k, v: [Tk, H, D]. Sample i owns query rows
    [cu_seqlens_q[i], cu_seqlens_q[i+1]) and key rows [cu_seqlens_k[i], cu_seqlens_k[i+1]) (separate, so video
    queries can attend to text keys of another length; empty samples are fine). max_seqlen_q/k (host ints)
    avoid a device sync when given; they must be at least the longest sample.
    """
    _check_same("varlen_attention", {"q": q, "k": k, "v": v})
    if q.dim() != 3 or k.shape != v.shape or k.dim() != 3 or q.shape[1:] != k.shape[1:]:
        raise ValueError(f"varlen_attention: expected q [Tq, H, D] and k, v [Tk, H, D], got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu.dim() != 1 or cu.dtype not in (torch.int32, torch.int64) or cu.numel() < 2:
            raise ValueError(f"varlen_attention: {name} must be a 1-D int32/int64 tensor of B + 1 offsets")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError("varlen_attention: cu_seqlens_q and cu_seqlens_k must describe the same number of samples")
    if max_seqlen_q is None:
        max_seqlen_q = _max_seqlen(cu_seqlens_q, q.shape[0], "cu_seqlens_q")
    if max_seqlen_k is None:
        max_seqlen_k = _max_seqlen(cu_seqlens_k, k.shape[0], "cu_seqlens_k")
    tau = _scale(scale, q.shape[-1])
    cu_q, cu_k = (cu.to(device=q.device, dtype=torch.int32).contiguous() for cu in (cu_seqlens_q, cu_seqlens_k))
    if use_triton("varlen_attention", backend, q, k, v, unsupported=_attention_unsupported(q)):
        return flash_attn_fwd(q, k, v, None, cu_q, cu_k, int(max_seqlen_q), int(max_seqlen_k), tau)[0]
    return reference.sdpa_varlen_attention(q, k, v, cu_q, cu_k, tau)


def guided_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_anchor: torch.Tensor,
                     v_anchor: torch.Tensor, *, frame_len: int, weight: float = 0.4, mode: str = "blend",
                     anchor_frame: int | None = None, scale: float | None = None,
                     backend: Backend = "auto") -> torch.Tensor:
    """AVID middle-frame attention guidance over frame-major tokens, without an L×L mask.

    q, k, v: [B, H, F·S, D], frame f = rows [f·S, (f+1)·S) with S = frame_len; k_anchor, v_anchor: [B, H, S_a, D]
    (the anchor frame's keys/values, e.g. cached from the middle segment, or a view k[:, :, m·S:(m+1)·S]).

    mode="blend":  out_f = (1 − weight)·Attn(Q_f, K_f, V_f) + weight·Attn(Q_f, K_a, V_a)
    mode="concat": out_f = Attn(Q_f, [K_f; K_a], [V_f; V_a])   (one softmax; ``weight`` unused)

    anchor_frame: the frame the anchor is taken from when it lies in this clip; its queries attend to their
    own frame only (the anchor is not counted twice). weight 0.4 is our default for AVID's ω (swept 0–1).
    """
    _check_same("guided_attention", {"q": q, "k": k, "v": v, "k_anchor": k_anchor, "v_anchor": v_anchor})
    if mode not in GUIDANCE_MODES:
        raise ValueError(f"guided_attention: mode must be one of {GUIDANCE_MODES}, got {mode!r}")
    if q.dim() != 4 or q.shape != k.shape or k.shape != v.shape:
        raise ValueError(f"guided_attention: q, k, v must all be [B, H, F·S, D], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k_anchor.shape != v_anchor.shape or k_anchor.dim() != 4 or k_anchor.shape[:2] != q.shape[:2] \
            or k_anchor.shape[3] != q.shape[3] or k_anchor.shape[2] == 0:
        raise ValueError(f"guided_attention: k_anchor, v_anchor must be [B, H, S_a ≥ 1, D] matching q "
                         f"{tuple(q.shape)}, got {tuple(k_anchor.shape)}, {tuple(v_anchor.shape)}")
    if frame_len <= 0 or q.shape[2] % frame_len != 0:
        raise ValueError(f"guided_attention: frame_len {frame_len} must divide the token count {q.shape[2]}")
    frames = q.shape[2] // frame_len
    if anchor_frame is not None and not 0 <= anchor_frame < frames:
        raise ValueError(f"guided_attention: anchor_frame {anchor_frame} is not a frame index in [0, {frames})")
    tau = _scale(scale, q.shape[-1])
    tensors = (q, k, v, k_anchor, v_anchor)
    if use_triton("guided_attention", backend, *tensors, unsupported=_attention_unsupported(q)):
        blend = mode == "blend"
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        return guided_attn_fwd(*tensors, frame_len, float(weight), -1 if anchor_frame is None else anchor_frame,
                               blend, tau, blend and needs_grad)[0]
    return reference.sdpa_guided_attention(*tensors, frame_len, float(weight), mode, anchor_frame, tau)


def _broadcasts_to(shape: torch.Size, target: torch.Size) -> bool:
    try:
        return torch.broadcast_shapes(shape, target) == target
    except RuntimeError:
        return False


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, *, scale: torch.Tensor | None = None,
             shift: torch.Tensor | None = None, eps: float = 1e-6, backend: Backend = "auto") -> torch.Tensor:
    """RMSNorm with optional adaLN modulation: y = x / sqrt(mean(x²) + eps) · weight · (1 + scale) + shift.

    x: [B, L, C] or [N, C]; weight: [C]; scale, shift: broadcastable to x ([B, 1, C] per sample as in DiT's
    adaLN, [B, L, C] per token, [C] global). Statistics in fp32, output in x's dtype.
    """
    if x.dim() not in (2, 3):
        raise ValueError(f"rms_norm: x must be [B, L, C] or [N, C], got {tuple(x.shape)}")
    channels = x.shape[-1]
    if weight is not None and weight.shape != (channels,):
        raise ValueError(f"rms_norm: weight must be [{channels}], got {list(weight.shape)}")
    for name, m in (("scale", scale), ("shift", shift)):
        if m is not None and not _broadcasts_to(m.shape, x.shape):
            raise ValueError(f"rms_norm: {name} {list(m.shape)} does not broadcast to x {list(x.shape)}")
    tensors = [t for t in (x, weight, scale, shift) if t is not None]
    unsupported = None
    if x.dtype not in _KERNEL_DTYPES:
        unsupported = f"dtype {x.dtype}"
    elif channels > MAX_NORM_DIM:
        unsupported = f"{channels} channels > {MAX_NORM_DIM}"
    if use_triton("rms_norm", backend, *tensors, unsupported=unsupported):
        return rms_norm_fwd(x, weight, scale, shift, float(eps))[0]
    return reference.torch_rms_norm(x, weight, scale, shift, eps)
