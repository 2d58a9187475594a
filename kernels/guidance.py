"""AVID middle-frame attention guidance in Triton, for frame-major video tokens, with no mask in memory.

Tokens of a clip are frame-major: q, k, v are [B, H, F·S, D] with frame f at rows [f·S, (f + 1)·S). The anchor
(AVID: the middle frame, cached from the middle segment at the same layer and step) is k_a, v_a [B, H, S_a, D].
Each query of frame f attends to the keys of its own frame, and to the anchor:

  blend  (AVID's guidance, weight w):
      o = (1 − w)·softmax(τ Q_f K_fᵀ) V_f + w·softmax(τ Q_f K_aᵀ) V_a
  concat (own frame and anchor in one softmax):
      o = softmax(τ Q_f [K_f; K_a]ᵀ) [V_f; V_a]

``anchor_frame`` (optional) names the frame whose own keys *are* the anchor (an in-clip anchor passed as a view
of k, v); its queries use their own frame only, so the anchor is not counted twice (blend: weight 0 there).

Forward: one program per (frame, BLOCK_M query tile, sample·head). The concat variant runs one online softmax
across both key segments; the blend variant keeps two states (m, l, acc) and mixes the two normalised outputs.

Backward: with O_own, O_a the two attentions and ω_own = 1 − w, ω_a = w their weights in the output,
dO_own = ω_own·dO and dO_a = ω_a·dO, so the FlashAttention backward applies per segment with

    D_a = ω_a·rowsum(dO ⊙ O_a),   D_own = rowsum(dO ⊙ O) − D_a   (= ω_own·rowsum(dO ⊙ O_own)),

which is why the forward saves O_a and lse_a (only when a gradient is needed). Concat is plain attention
over the union of keys (D = rowsum(dO ⊙ O), one lse). dK_a/dV_a collect every frame's queries: each
(frame, anchor tile) program writes a partial into an fp32 [B, H, F, S_a, D] buffer that is summed over F,
which keeps the backward free of atomics and deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.flash_attention import (
    LOG2E,
    bhl_strides,
    bwd_dkdv_queries,
    bwd_dq_sequence,
    finish_softmax,
    fwd_sequence,
    head_block,
    last_dim_contiguous,
    load_lse2,
    load_rows,
    store_rows,
)
from kernels.runtime import cfg, configs

_FWD_CONFIGS = configs(
    gpu=[
        cfg(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
        cfg(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
        cfg(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    ],
    interpreter=cfg(BLOCK_M=32, BLOCK_N=16),
)
_BWD_DQ_CONFIGS = configs(
    gpu=[
        cfg(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3),
        cfg(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    ],
    interpreter=cfg(BLOCK_M=32, BLOCK_N=16),
)
_BWD_DKDV_CONFIGS = configs(
    gpu=[
        cfg(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=3),
        cfg(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    ],
    interpreter=cfg(BLOCK_M=16, BLOCK_N=32),
)
_TUNE_KEY = ["HEAD_DIM", "BLEND"]


@triton.jit
def _anchor_weight(f, anchor_frame, weight, BLEND: tl.constexpr):
    """Weight of the anchor attention for frame f (blend), or 1/0 = use/skip the anchor keys (concat)."""
    if BLEND:
        return tl.where(f == anchor_frame, 0.0, weight)
    else:
        return tl.where(f == anchor_frame, 0.0, 1.0)


@triton.autotune(configs=_FWD_CONFIGS, key=_TUNE_KEY)
@triton.jit
def _guided_fwd(Q, K, V, KA, VA, OUT, LSE, OA, LSEA,
                stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
                stride_vb, stride_vh, stride_vl, stride_kab, stride_kah, stride_kal,
                stride_vab, stride_vah, stride_val, stride_ob, stride_oh, stride_ol,
                stride_lb, stride_lh, stride_ll,
                num_heads, frame_len, anchor_len, anchor_frame, weight, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLEND: tl.constexpr, SAVE_ANCHOR: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (F·cdiv(S, BLOCK_M), B·H): program = BLOCK_M queries of one frame of one (sample, head)."""
    tiles = tl.cdiv(frame_len, BLOCK_M)
    f = tl.program_id(0) // tiles
    pid_m = tl.program_id(0) % tiles
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    row0 = f.to(tl.int64) * frame_len
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < frame_len

    q = load_rows(Q + b * stride_qb + h * stride_qh + row0 * stride_ql, offs_m, row_ok, stride_ql, offs_d,
                  HEAD_DIM, EVEN_D)
    k_base = K + b * stride_kb + h * stride_kh + row0 * stride_kl
    v_base = V + b * stride_vb + h * stride_vh + row0 * stride_vl
    ka_base = KA + b * stride_kab + h * stride_kah
    va_base = VA + b * stride_vab + h * stride_vah
    w_a = _anchor_weight(f, anchor_frame, weight, BLEND)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = fwd_sequence(acc, m_i, l_i, q, k_base, v_base, stride_kl, stride_vl, frame_len, Q, qk_scale,
                                 offs_n, offs_d, HEAD_DIM, EVEN_D, BLOCK_N, False)
    row_off = b * stride_lb + h * stride_lh + (row0 + offs_m) * stride_ll
    o_base = OUT + b * stride_ob + h * stride_oh + row0 * stride_ol
    if BLEND:
        acc_a = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        m_a = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_a = tl.zeros([BLOCK_M], dtype=tl.float32)
        if w_a != 0.0:
            acc_a, m_a, l_a = fwd_sequence(acc_a, m_a, l_a, q, ka_base, va_base, stride_kal, stride_val,
                                           anchor_len, Q, qk_scale, offs_n, offs_d, HEAD_DIM, EVEN_D, BLOCK_N,
                                           False)
        o_own, lse_own = finish_softmax(acc, m_i, l_i)
        o_a, lse_a = finish_softmax(acc_a, m_a, l_a)
        store_rows(o_base, offs_m, row_ok, stride_ol, offs_d, (1.0 - w_a) * o_own + w_a * o_a, HEAD_DIM, EVEN_D)
        tl.store(LSE + row_off, lse_own, mask=row_ok)
        if SAVE_ANCHOR:
            store_rows(OA + b * stride_ob + h * stride_oh + row0 * stride_ol, offs_m, row_ok, stride_ol, offs_d,
                       o_a, HEAD_DIM, EVEN_D)
            tl.store(LSEA + row_off, lse_a, mask=row_ok)
    else:
        if w_a != 0.0:
            acc, m_i, l_i = fwd_sequence(acc, m_i, l_i, q, ka_base, va_base, stride_kal, stride_val, anchor_len,
                                         Q, qk_scale, offs_n, offs_d, HEAD_DIM, EVEN_D, BLOCK_N, False)
        o, lse = finish_softmax(acc, m_i, l_i)
        store_rows(o_base, offs_m, row_ok, stride_ol, offs_d, o, HEAD_DIM, EVEN_D)
        tl.store(LSE + row_off, lse, mask=row_ok)


@triton.autotune(configs=_BWD_DQ_CONFIGS, key=_TUNE_KEY)
@triton.jit
def _guided_bwd_dq(Q, K, V, KA, VA, OUT, OA, DO, DQ, LSE, LSEA, DELTA, DELTAA,
                   stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
                   stride_vb, stride_vh, stride_vl, stride_kab, stride_kah, stride_kal,
                   stride_vab, stride_vah, stride_val, stride_ob, stride_oh, stride_ol,
                   stride_lb, stride_lh, stride_ll,
                   num_heads, frame_len, anchor_len, anchor_frame, weight, sm_scale, qk_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLEND: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Per query tile: D_own (and D_a for blend), stored for the dK/dV kernel, and dQ over both key segments.

    OUT, OA, DO and DQ share the strides of OUT (the host makes them alike); LSE, LSEA, DELTA, DELTAA those of LSE.
    """
    tiles = tl.cdiv(frame_len, BLOCK_M)
    f = tl.program_id(0) // tiles
    pid_m = tl.program_id(0) % tiles
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    row0 = f.to(tl.int64) * frame_len
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < frame_len

    q = load_rows(Q + b * stride_qb + h * stride_qh + row0 * stride_ql, offs_m, row_ok, stride_ql, offs_d,
                  HEAD_DIM, EVEN_D)
    o_off = b * stride_ob + h * stride_oh + row0 * stride_ol
    do = load_rows(DO + o_off, offs_m, row_ok, stride_ol, offs_d, HEAD_DIM, EVEN_D)
    o = load_rows(OUT + o_off, offs_m, row_ok, stride_ol, offs_d, HEAD_DIM, EVEN_D)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    row_off = b * stride_lb + h * stride_lh + (row0 + offs_m) * stride_ll
    lse2 = load_lse2(LSE + row_off, row_ok)
    w_a = _anchor_weight(f, anchor_frame, weight, BLEND)
    if BLEND:
        o_a = load_rows(OA + o_off, offs_m, row_ok, stride_ol, offs_d, HEAD_DIM, EVEN_D)
        delta_a = w_a * tl.sum(do.to(tl.float32) * o_a.to(tl.float32), 1)
        delta = delta - delta_a
        lse2_a = load_lse2(LSEA + row_off, row_ok)
        tl.store(DELTAA + row_off, delta_a, mask=row_ok)
        w_own = 1.0 - w_a
    else:
        delta_a = delta
        lse2_a = lse2
        w_own = 1.0
    tl.store(DELTA + row_off, delta, mask=row_ok)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = bwd_dq_sequence(dq, q, do, lse2, delta, K + b * stride_kb + h * stride_kh + row0 * stride_kl,
                         V + b * stride_vb + h * stride_vh + row0 * stride_vl, stride_kl, stride_vl, frame_len, Q,
                         qk_scale, w_own, offs_n, offs_d, HEAD_DIM, EVEN_D, BLOCK_N, False)
    if w_a != 0.0:
        dq = bwd_dq_sequence(dq, q, do, lse2_a, delta_a, KA + b * stride_kab + h * stride_kah,
                             VA + b * stride_vab + h * stride_vah, stride_kal, stride_val, anchor_len, Q,
                             qk_scale, w_a, offs_n, offs_d, HEAD_DIM, EVEN_D, BLOCK_N, False)
    store_rows(DQ + o_off, offs_m, row_ok, stride_ol, offs_d, dq * sm_scale, HEAD_DIM, EVEN_D)


@triton.autotune(configs=_BWD_DKDV_CONFIGS, key=_TUNE_KEY)
@triton.jit
def _guided_bwd_dkdv(Q, K, V, KA, VA, DO, DK, DV, DKA, DVA, LSE, LSEA, DELTA, DELTAA,
                     stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
                     stride_vb, stride_vh, stride_vl, stride_kab, stride_kah, stride_kal,
                     stride_vab, stride_vah, stride_val, stride_dob, stride_doh, stride_dol,
                     stride_dkb, stride_dkh, stride_dkl, stride_pb, stride_ph, stride_pf, stride_pl,
                     stride_lb, stride_lh, stride_ll,
                     num_heads, frame_len, anchor_len, anchor_frame, weight, sm_scale, qk_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLEND: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (F·(own tiles + anchor tiles), B·H): a key tile of frame f's own keys or of the anchor, against the
    queries of frame f. Own tiles write dK/dV (DK, DV share strides); anchor tiles write their frame's partial
    dK_a/dV_a into fp32 [B, H, F, S_a, D] buffers (DKA, DVA share strides)."""
    tiles_own = tl.cdiv(frame_len, BLOCK_N)
    per_frame = tiles_own + tl.cdiv(anchor_len, BLOCK_N)
    f = tl.program_id(0) // per_frame
    t = tl.program_id(0) % per_frame
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    row0 = f.to(tl.int64) * frame_len
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = Q + b * stride_qb + h * stride_qh + row0 * stride_ql
    do_base = DO + b * stride_dob + h * stride_doh + row0 * stride_dol
    row_base = b * stride_lb + h * stride_lh + row0 * stride_ll
    w_a = _anchor_weight(f, anchor_frame, weight, BLEND)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if t < tiles_own:
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = offs_n < frame_len
        k = load_rows(K + b * stride_kb + h * stride_kh + row0 * stride_kl, offs_n, col_ok, stride_kl, offs_d,
                      HEAD_DIM, EVEN_D)
        v = load_rows(V + b * stride_vb + h * stride_vh + row0 * stride_vl, offs_n, col_ok, stride_vl, offs_d,
                      HEAD_DIM, EVEN_D)
        if BLEND:
            w_own = 1.0 - w_a
        else:
            w_own = 1.0
        dk, dv = bwd_dkdv_queries(dk, dv, k, v, col_ok, q_base, do_base, LSE + row_base, DELTA + row_base,
                                  stride_ql, stride_dol, stride_ll, frame_len, qk_scale, w_own, offs_m, offs_d,
                                  HEAD_DIM, EVEN_D, BLOCK_M, False)
        dk_off = b * stride_dkb + h * stride_dkh + row0 * stride_dkl
        store_rows(DK + dk_off, offs_n, col_ok, stride_dkl, offs_d, dk * sm_scale, HEAD_DIM, EVEN_D)
        store_rows(DV + dk_off, offs_n, col_ok, stride_dkl, offs_d, dv * w_own, HEAD_DIM, EVEN_D)
    else:
        offs_n = (t - tiles_own) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = offs_n < anchor_len
        if w_a != 0.0:
            k = load_rows(KA + b * stride_kab + h * stride_kah, offs_n, col_ok, stride_kal, offs_d, HEAD_DIM,
                          EVEN_D)
            v = load_rows(VA + b * stride_vab + h * stride_vah, offs_n, col_ok, stride_val, offs_d, HEAD_DIM,
                          EVEN_D)
            if BLEND:
                lse_base = LSEA + row_base
                delta_base = DELTAA + row_base
                w = w_a
            else:
                lse_base = LSE + row_base
                delta_base = DELTA + row_base
                w = 1.0
            dk, dv = bwd_dkdv_queries(dk, dv, k, v, col_ok, q_base, do_base, lse_base, delta_base, stride_ql,
                                      stride_dol, stride_ll, frame_len, qk_scale, w, offs_m, offs_d, HEAD_DIM,
                                      EVEN_D, BLOCK_M, False)
            dk = dk * sm_scale
            dv = dv * w
        part = b * stride_pb + h * stride_ph + f.to(tl.int64) * stride_pf
        store_rows(DKA + part, offs_n, col_ok, stride_pl, offs_d, dk, HEAD_DIM, EVEN_D)
        store_rows(DVA + part, offs_n, col_ok, stride_pl, offs_d, dv, HEAD_DIM, EVEN_D)


def _bhl(t: torch.Tensor) -> tuple[int, int, int]:
    return bhl_strides(t, packed=False)


def guided_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_anchor: torch.Tensor,
                             v_anchor: torch.Tensor, frame_len: int, weight: float, anchor_frame: int, blend: bool,
                             scale: float, save_anchor: bool
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward; returns (o, lse, o_a, lse_a), the last two empty unless blend and save_anchor."""
    q, k, v, k_anchor, v_anchor = (last_dim_contiguous(t) for t in (q, k, v, k_anchor, v_anchor))
    batch, heads, length, head_dim = q.shape
    frames = length // frame_len
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    save = blend and save_anchor
    out_a = torch.empty_like(out) if save else q.new_empty(0)
    lse_a = torch.empty_like(lse) if save else lse.new_empty(0)
    if out.numel() == 0:
        return out, lse, out_a, lse_a
    grid = lambda meta: (frames * triton.cdiv(frame_len, meta["BLOCK_M"]), batch * heads)
    _guided_fwd[grid](
        q, k, v, k_anchor, v_anchor, out, lse, out_a if save else out, lse_a if save else lse,
        *_bhl(q), *_bhl(k), *_bhl(v), *_bhl(k_anchor), *_bhl(v_anchor), *_bhl(out), *_bhl(lse),
        heads, frame_len, k_anchor.shape[2], anchor_frame, weight, scale * LOG2E,
        HEAD_DIM=head_dim, BLOCK_D=head_block(head_dim), BLEND=blend, SAVE_ANCHOR=save,
    )
    return out, lse, out_a, lse_a


def guided_attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              k_anchor: torch.Tensor, v_anchor: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                              out_a: torch.Tensor, lse_a: torch.Tensor, frame_len: int, weight: float,
                              anchor_frame: int, blend: bool, scale: float
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch dQ (+ D), then dK/dV with per-frame anchor partials; returns (dq, dk, dv, dk_a, dv_a)."""
    q, k, v, k_anchor, v_anchor = (last_dim_contiguous(t) for t in (q, k, v, k_anchor, v_anchor))
    batch, heads, length, head_dim = q.shape
    frames = length // frame_len
    anchor_len = k_anchor.shape[2]
    # O, O_a, dO and dQ are indexed with one set of strides, and so are dK, dV.
    out = out.contiguous()
    do = do.contiguous()
    out_a = out_a.contiguous() if blend else out
    dq = torch.empty_like(out)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(k.shape, dtype=v.dtype, device=v.device)
    delta = torch.empty_like(lse)
    delta_a = torch.empty_like(lse) if blend else delta
    lse_a = lse_a if blend else lse
    part_shape = (batch, heads, frames, anchor_len, head_dim)
    dk_part = torch.empty(part_shape, dtype=torch.float32, device=q.device)
    dv_part = torch.empty(part_shape, dtype=torch.float32, device=q.device)
    if q.numel() == 0:
        return dq, dk, dv, torch.zeros_like(k_anchor), torch.zeros_like(v_anchor)
    common = dict(HEAD_DIM=head_dim, BLOCK_D=head_block(head_dim), BLEND=blend)
    sizes = (heads, frame_len, anchor_len, anchor_frame, weight, scale, scale * LOG2E)
    _guided_bwd_dq[lambda meta: (frames * triton.cdiv(frame_len, meta["BLOCK_M"]), batch * heads)](
        q, k, v, k_anchor, v_anchor, out, out_a, do, dq, lse, lse_a, delta, delta_a,
        *_bhl(q), *_bhl(k), *_bhl(v), *_bhl(k_anchor), *_bhl(v_anchor), *_bhl(out), *_bhl(lse),
        *sizes, **common,
    )
    tiles = lambda meta: triton.cdiv(frame_len, meta["BLOCK_N"]) + triton.cdiv(anchor_len, meta["BLOCK_N"])
    _guided_bwd_dkdv[lambda meta: (frames * tiles(meta), batch * heads)](
        q, k, v, k_anchor, v_anchor, do, dk, dv, dk_part, dv_part, lse, lse_a, delta, delta_a,
        *_bhl(q), *_bhl(k), *_bhl(v), *_bhl(k_anchor), *_bhl(v_anchor), *_bhl(do), *_bhl(dk),
        *dk_part.stride()[:4], *_bhl(lse),
        *sizes, **common,
    )
    return dq, dk, dv, dk_part.sum(2).to(k_anchor.dtype), dv_part.sum(2).to(v_anchor.dtype)


# ----------------------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------------------


@torch.library.custom_op("mglab::guided_attn_fwd", mutates_args=())
def guided_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_anchor: torch.Tensor,
                    v_anchor: torch.Tensor, frame_len: int, weight: float, anchor_frame: int, blend: bool,
                    scale: float, save_anchor: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o, lse, o_a, lse_a) of frame-guided attention; o_a, lse_a are empty unless blend and save_anchor."""
    return guided_attention_forward(q, k, v, k_anchor, v_anchor, frame_len, weight, anchor_frame, blend, scale,
                                    save_anchor)


@guided_attn_fwd.register_fake
def _(q, k, v, k_anchor, v_anchor, frame_len, weight, anchor_frame, blend, scale, save_anchor):
    save = blend and save_anchor
    out_a = q.new_empty(q.shape) if save else q.new_empty(0)
    lse_shape = q.shape[:-1] if save else (0,)
    return (q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32), out_a,
            q.new_empty(lse_shape, dtype=torch.float32))


@torch.library.custom_op("mglab::guided_attn_bwd", mutates_args=())
def guided_attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_anchor: torch.Tensor,
                    v_anchor: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, out_a: torch.Tensor,
                    lse_a: torch.Tensor, frame_len: int, weight: float, anchor_frame: int, blend: bool,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dk_a, dv_a) of frame-guided attention."""
    return guided_attention_backward(do, q, k, v, k_anchor, v_anchor, out, lse, out_a, lse_a, frame_len, weight,
                                     anchor_frame, blend, scale)


@guided_attn_bwd.register_fake
def _(do, q, k, v, k_anchor, v_anchor, out, lse, out_a, lse_a, frame_len, weight, anchor_frame, blend, scale):
    return tuple(t.new_empty(t.shape) for t in (q, k, v, k_anchor, v_anchor))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, k_anchor, v_anchor, frame_len, weight, anchor_frame, blend, scale, save_anchor = inputs
    out, lse, out_a, lse_a = output
    ctx.save_for_backward(q, k, v, k_anchor, v_anchor, out, lse, out_a, lse_a)
    ctx.args = (frame_len, weight, anchor_frame, blend, scale)
    ctx.needs_anchor = blend and not save_anchor
    ctx.mark_non_differentiable(lse, out_a, lse_a)


def _backward(ctx, dout, *_unused):
    if ctx.needs_anchor:
        raise RuntimeError("guided_attn_fwd ran with save_anchor=False, so its blend output cannot be "
                           "differentiated; call it with save_anchor=True when gradients are needed")
    q, k, v, k_anchor, v_anchor, out, lse, out_a, lse_a = ctx.saved_tensors
    grads = guided_attn_bwd(dout, q, k, v, k_anchor, v_anchor, out, lse, out_a, lse_a, *ctx.args)
    return (*grads, None, None, None, None, None, None)


guided_attn_fwd.register_autograd(_backward, setup_context=_setup_context)
