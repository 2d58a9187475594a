"""Plain PyTorch versions of every kernel: references for the tests and fallbacks for the dispatch.

Two independent formulations of each op:

- ``reference_*``: the definition written out, scores and a dense boolean mask over the whole (packed or
  frame-major) sequence, then softmax; run in float64 by the tests. Rows with no allowed key give 0.
- ``sdpa_*`` / ``torch_rms_norm``: what ``kernels.ops`` runs off CUDA: ``F.scaled_dot_product_attention``
  per sequence or per frame (no L×L mask), ``F.rms_norm`` in fp32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange, repeat

# ----------------------------------------------------------------------------------------------------------
# References (dense masks, any dtype; the tests use float64)
# ----------------------------------------------------------------------------------------------------------


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None,
                     scale: float | None = None) -> torch.Tensor:
    """softmax(τ·Q·Kᵀ restricted to ``allowed``)·V, with τ = 1/sqrt(D) by default; rows with no allowed key → 0.

    q [..., Lq, D], k, v [..., Lk, D]; ``allowed`` bool broadcastable to [..., Lq, Lk] (True = attend).
    """
    tau = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.einsum("...qd,...kd->...qk", q, k) * tau
    if allowed is None:
        return torch.softmax(s, dim=-1) @ v
    allowed = allowed.expand_as(s)
    has_key = allowed.any(dim=-1, keepdim=True)
    s = s.masked_fill(~allowed, float("-inf")).masked_fill(~has_key, 0.0)
    p = torch.softmax(s, dim=-1).masked_fill(~allowed, 0.0)
    return p @ v


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        key_padding_mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Batched attention, q [B, H, Lq, D], k, v [B, H, Lk, D], key_padding_mask [B, Lk] (True = attend)."""
    allowed = None if key_padding_mask is None else rearrange(key_padding_mask, "b k -> b 1 1 k")
    return masked_attention(q, k, v, allowed, scale)


def sequence_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Index of the packed sequence each of the ``total`` tokens belongs to."""
    lengths = cu_seqlens.diff().long()
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths,
                                   output_size=total)


def reference_varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                               cu_seqlens_k: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Packed attention as one block-diagonal mask: q [Tq, H, D], k, v [Tk, H, D]; query i sees key j iff both
    belong to the same sample."""
    allowed = sequence_ids(cu_seqlens_q, q.shape[0])[:, None] == sequence_ids(cu_seqlens_k, k.shape[0])[None, :]
    out = masked_attention(*(rearrange(t, "t h d -> h t d") for t in (q, k, v)), allowed, scale)
    return rearrange(out, "h t d -> t h d")


def reference_guided_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_anchor: torch.Tensor,
                               v_anchor: torch.Tensor, frame_len: int, weight: float, mode: str = "blend",
                               anchor_frame: int | None = None, scale: float | None = None) -> torch.Tensor:
    """AVID middle-frame guidance with dense masks over the frame-major sequence q, k, v [B, H, F·S, D].

    Frame of token i: i // S. blend: (1 − w_i)·Attn(q, own frame) + w_i·Attn(q, anchor), w_i = 0 for queries of
    ``anchor_frame`` and ``weight`` otherwise. concat: one softmax over own-frame keys and anchor keys (the
    anchor masked out for queries of ``anchor_frame``).
    """
    length = q.shape[2]
    frame = torch.arange(length, device=q.device) // frame_len
    same_frame = frame[:, None] == frame[None, :]
    uses_anchor = frame != (-1 if anchor_frame is None else anchor_frame)
    if mode == "concat":
        allowed = torch.cat([same_frame, repeat(uses_anchor, "q -> q s", s=k_anchor.shape[2])], dim=1)
        return masked_attention(q, torch.cat([k, k_anchor], 2), torch.cat([v, v_anchor], 2), allowed, scale)
    own = masked_attention(q, k, v, same_frame, scale)
    anchor = masked_attention(q, k_anchor, v_anchor, None, scale)
    w = rearrange(uses_anchor.to(q.dtype) * weight, "q -> q 1")
    return (1 - w) * own + w * anchor


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                       shift: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """y = x / sqrt(mean(x²) + eps) · weight · (1 + scale) + shift, with torch broadcasting of weight/scale/shift."""
    y = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight
    if scale is not None:
        y = y * (1 + scale)
    if shift is not None:
        y = y + shift
    return y


# ----------------------------------------------------------------------------------------------------------
# Fallbacks (used by kernels.ops off CUDA, or with backend="torch")
# ----------------------------------------------------------------------------------------------------------


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None,
                   scale: float) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with the padding mask as a broadcast [B, 1, 1, Lk] boolean mask."""
    mask = None if key_padding_mask is None else rearrange(key_padding_mask, "b k -> b 1 1 k")
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if mask is not None:  # rows with no key: 0, as the kernel (not every SDPA backend agrees on this)
        out = out.masked_fill(~rearrange(key_padding_mask.any(-1), "b -> b 1 1 1"), 0.0)
    return out


def cpu_autocast_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None,
                           scale: float) -> torch.Tensor:
    """softmax(scale·QKᵀ)·V under CPU autocast: both products in bfloat16, the softmax in float32. The CPU's fused
    SDPA is ~3x slower in bfloat16 than in float32 on a DiT's short sequences (backward above all), and ~2x slower in
    float32 than this. Rows with no key: 0, as `sdpa_attention`."""
    scores = (q @ k.transpose(-1, -2)).float() * scale
    if key_padding_mask is not None:
        keep = rearrange(key_padding_mask, "b k -> b 1 1 k")
        scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)  # not -inf: a keyless row stays finite
    weights = torch.softmax(scores, dim=-1)
    if key_padding_mask is not None:
        weights = weights.masked_fill(~keep.any(-1, keepdim=True), 0.0)
    return weights.to(v.dtype) @ v


def sdpa_varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                          cu_seqlens_k: torch.Tensor, scale: float) -> torch.Tensor:
    """One SDPA call per packed sample; samples without keys output 0."""
    bounds_q = cu_seqlens_q.tolist()
    bounds_k = cu_seqlens_k.tolist()
    outs = []
    for i in range(len(bounds_q) - 1):
        # [1, H, L, D]: SDPA's fused backends (flash, cuDNN, efficient) take 4-D inputs only
        qi, ki, vi = (rearrange(t[a:b], "t h d -> 1 h t d") for t, a, b in (
            (q, bounds_q[i], bounds_q[i + 1]), (k, bounds_k[i], bounds_k[i + 1]), (v, bounds_k[i], bounds_k[i + 1])))
        if ki.shape[2] == 0:
            outs.append(torch.zeros_like(qi))
        else:
            outs.append(F.scaled_dot_product_attention(qi, ki, vi, scale=scale))
    return rearrange(torch.cat(outs, dim=2), "1 h t d -> t h d")


def sdpa_guided_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_anchor: torch.Tensor,
                          v_anchor: torch.Tensor, frame_len: int, weight: float, mode: str, anchor_frame: int | None,
                          scale: float) -> torch.Tensor:
    """Guided attention as 4-D, maskless SDPA calls, so that SDPA can run its fused backends (flash / cuDNN
    take [B, H, L, D] without an arbitrary mask; a 5-D layout or a boolean mask sends it to the math backend).

    blend: own-frame attention with the frames folded into the batch ([B·F, H, S, D]); the anchor part needs no
    folding (every query of a sample sees the same anchor keys): one call on [B, H, F·S, D] against the anchor.
    concat: one call per frame over [K_f; K_a] ([B·F, H, S + S_a, D]); the queries of ``anchor_frame`` see their
    own frame only, so they are recomputed alone instead of masking the anchor keys out for them.
    """
    frames = q.shape[2] // frame_len
    fold = lambda t: rearrange(t, "b h (f s) d -> (b f) h s d", s=frame_len)
    unfold = lambda t: rearrange(t, "(b f) h s d -> b h (f s) d", f=frames)
    qf, kf, vf = (fold(t) for t in (q, k, v))
    if mode == "concat":
        ka, va = (repeat(t, "b h s d -> (b f) h s d", f=frames) for t in (k_anchor, v_anchor))
        out = unfold(F.scaled_dot_product_attention(qf, torch.cat([kf, ka], 2), torch.cat([vf, va], 2), scale=scale))
        if anchor_frame is None:
            return out
        rows = slice(anchor_frame * frame_len, (anchor_frame + 1) * frame_len)
        own = F.scaled_dot_product_attention(q[:, :, rows], k[:, :, rows], v[:, :, rows], scale=scale)
        return torch.cat([out[:, :, : rows.start], own, out[:, :, rows.stop:]], dim=2)
    own = unfold(F.scaled_dot_product_attention(qf, kf, vf, scale=scale))
    anchor = F.scaled_dot_product_attention(q, k_anchor, v_anchor, scale=scale)
    uses_anchor = torch.arange(frames, device=q.device) != (-1 if anchor_frame is None else anchor_frame)
    w = repeat(uses_anchor.to(q.dtype) * weight, "f -> (f s) 1", s=frame_len)
    return (1 - w) * own + w * anchor


def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor | None, scale: torch.Tensor | None,
                   shift: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``F.rms_norm`` and the adaLN modulation computed in fp32, returned in x's dtype."""
    if scale is None and shift is None:
        return F.rms_norm(x.float(), (x.shape[-1],), None if weight is None else weight.float(), eps).to(x.dtype)
    # adaLN: the weight folds into the per-sample factor w·(1 + scale), and one addcmul applies factor and shift
    # (a third faster, forward and backward, than two products and a sum over the whole of x)
    normed = F.rms_norm(x.float(), (x.shape[-1],), None, eps)
    factor = None if weight is None else weight.float()
    if scale is not None:
        factor = 1 + scale.float() if factor is None else factor * (1 + scale.float())
    if shift is None:
        return (normed * factor).to(x.dtype)
    return (normed + shift.float() if factor is None else torch.addcmul(shift.float(), normed, factor)).to(x.dtype)
