"""Flash attention in Triton: batched (with an optional key padding mask) and packed variable-length.

Notation for one query row q and its keys k_j, values v_j (τ = softmax scale, 1/sqrt(D) by default):

    s_j = τ q·k_j,    lse = log Σ_j exp(s_j),    p_j = exp(s_j − lse),    o = Σ_j p_j v_j.

Forward, online softmax (FlashAttention-2): keys are visited in tiles of BLOCK_N. A running maximum m, running
sum l and unnormalised accumulator acc are rescaled by α = exp(m − m') whenever the maximum grows:

    m' = max(m, max_j s_j),   l' = α·l + Σ_j exp(s_j − m'),   acc' = α·acc + Σ_j exp(s_j − m')·v_j,

and at the end o = acc / l, lse = m + log l (saved, fp32, for the backward). The kernels work in base 2
(exp2 with the scores scaled by τ·log2 e) and store the natural-log lse.

Backward, recomputing P = exp(S − lse) tile by tile instead of storing it:

    D_i = rowsum(dO_i ⊙ O_i),   dP = dO·Vᵀ,   dS = P ⊙ (dP − D),
    dQ = τ·dS·K,   dK = τ·dSᵀ·Q,   dV = Pᵀ·dO.

Two kernels, no atomics: one program per query tile computes D (stored) and dQ; then one program per key
tile streams the query tiles and accumulates dK and dV.

Masking: key j counts iff it lies inside its sequence (tail tiles and packed neighbours are masked) and, when
given, key_padding_mask[b, j] is True. A query with no valid key gets o = 0 and lse = −inf (the backward reads
that as P = 0). Only the tail tile of each sequence pays for the score masking when there is no padding mask.

Layouts: batched q, k, v are [B, H, L, D] (any strides with a contiguous last dim); packed ones are [T, H, D]
with cumulative lengths cu_seqlens_q / cu_seqlens_k (int32, B + 1 entries), so queries and keys of a sample
may have different lengths (cross-attention to text). lse has the shape of q without the last dim.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.runtime import cfg, configs

LOG2E: float = math.log2(math.e)

# ----------------------------------------------------------------------------------------------------------
# Shared tile helpers (also used by kernels.guidance)
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def load_rows(base, rows, row_ok, stride_l, offs_d, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr):
    """Load a [rows, BLOCK_D] tile; rows outside the sequence and padded head-dim columns read 0."""
    ptrs = base + rows[:, None] * stride_l + offs_d[None, :]
    if EVEN_D:
        mask = row_ok[:, None]
    else:
        mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def store_rows(base, rows, row_ok, stride_l, offs_d, value, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr):
    """Store a [rows, BLOCK_D] tile, skipping rows outside the sequence and padded head-dim columns."""
    ptrs = base + rows[:, None] * stride_l + offs_d[None, :]
    if EVEN_D:
        mask = row_ok[:, None]
    else:
        mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    tl.store(ptrs, value.to(base.dtype.element_ty), mask=mask)


@triton.jit
def load_lse2(ptrs, row_ok):
    """Saved natural-log lse → base-2 pivot for P = exp2(S·log2 e − lse2); rows without keys give +inf (P = 0)."""
    lse = tl.load(ptrs, mask=row_ok, other=float("-inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)  # log2(e)


@triton.jit
def fwd_keys(acc, m_i, l_i, q, k_base, v_base, stride_kl, stride_vl, lo, hi, n_keys, kpm_base, qk_scale,
             offs_n, offs_d, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr,
             MASKED: tl.constexpr, HAS_KPM: tl.constexpr):
    """Online-softmax update of (acc, m, l) with keys [lo, hi) of one sequence (base-2 scores).

    MASKED: apply the key mask (inside the sequence, and the padding mask when HAS_KPM) to the scores; full
    tiles of an unmasked sequence skip it. A still-empty row keeps m = −inf; the pivot then falls back to 0
    so that no −inf − (−inf) appears.
    """
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        col_ok = cols < n_keys
        if HAS_KPM:
            col_ok = col_ok & (tl.load(kpm_base + cols, mask=col_ok, other=0) != 0)
        k = load_rows(k_base, cols, col_ok, stride_kl, offs_d, HEAD_DIM, EVEN_D)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        if MASKED:
            s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        pivot = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - pivot)
        p = tl.exp2(s - pivot[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = load_rows(v_base, cols, col_ok, stride_vl, offs_d, HEAD_DIM, EVEN_D)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def fwd_sequence(acc, m_i, l_i, q, k_base, v_base, stride_kl, stride_vl, n_keys, kpm_base, qk_scale, offs_n,
                 offs_d, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr,
                 HAS_KPM: tl.constexpr):
    """All keys [0, n_keys) of a sequence: full tiles unmasked, then the masked tail (or all masked with a KPM)."""
    if HAS_KPM:
        acc, m_i, l_i = fwd_keys(acc, m_i, l_i, q, k_base, v_base, stride_kl, stride_vl, 0, n_keys, n_keys,
                                 kpm_base, qk_scale, offs_n, offs_d, HEAD_DIM, EVEN_D, BLOCK_N, True, True)
    else:
        n_full = (n_keys // BLOCK_N) * BLOCK_N
        acc, m_i, l_i = fwd_keys(acc, m_i, l_i, q, k_base, v_base, stride_kl, stride_vl, 0, n_full, n_keys,
                                 kpm_base, qk_scale, offs_n, offs_d, HEAD_DIM, EVEN_D, BLOCK_N, False, False)
        acc, m_i, l_i = fwd_keys(acc, m_i, l_i, q, k_base, v_base, stride_kl, stride_vl, n_full, n_keys, n_keys,
                                 kpm_base, qk_scale, offs_n, offs_d, HEAD_DIM, EVEN_D, BLOCK_N, True, False)
    return acc, m_i, l_i


@triton.jit
def finish_softmax(acc, m_i, l_i):
    """o = acc / l and the natural-log lse = (m + log2 l)·ln 2; rows without keys: o = 0, lse = −inf."""
    has = l_i > 0.0
    l_safe = tl.where(has, l_i, 1.0)
    o = acc / l_safe[:, None]
    lse = tl.where(has, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))  # ln(2)
    return o, lse


@triton.jit
def bwd_dq_keys(dq, q, do, lse2, delta, k_base, v_base, stride_kl, stride_vl, lo, hi, n_keys, kpm_base,
                qk_scale, dp_scale, offs_n, offs_d, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr,
                BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_KPM: tl.constexpr):
    """dQ += dS·K over keys [lo, hi), with P = exp2(S − lse2), dS = P ⊙ (dp_scale·dO·Vᵀ − D).

    dp_scale is the weight of this attention in the output (1 for plain attention; AVID's blend uses 1 − w
    and w), so that dO of this attention is dp_scale·dO. The caller multiplies the sum by τ.
    """
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        col_ok = cols < n_keys
        if HAS_KPM:
            col_ok = col_ok & (tl.load(kpm_base + cols, mask=col_ok, other=0) != 0)
        k = load_rows(k_base, cols, col_ok, stride_kl, offs_d, HEAD_DIM, EVEN_D)
        v = load_rows(v_base, cols, col_ok, stride_vl, offs_d, HEAD_DIM, EVEN_D)
        p = tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse2[:, None])
        if MASKED:
            p = tl.where(col_ok[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v)) * dp_scale
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@triton.jit
def bwd_dq_sequence(dq, q, do, lse2, delta, k_base, v_base, stride_kl, stride_vl, n_keys, kpm_base, qk_scale,
                    dp_scale, offs_n, offs_d, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr,
                    BLOCK_N: tl.constexpr, HAS_KPM: tl.constexpr):
    """bwd_dq_keys over all keys of a sequence, masking only the tail tile unless there is a padding mask."""
    if HAS_KPM:
        dq = bwd_dq_keys(dq, q, do, lse2, delta, k_base, v_base, stride_kl, stride_vl, 0, n_keys, n_keys,
                         kpm_base, qk_scale, dp_scale, offs_n, offs_d, HEAD_DIM, EVEN_D, BLOCK_N, True, True)
    else:
        n_full = (n_keys // BLOCK_N) * BLOCK_N
        dq = bwd_dq_keys(dq, q, do, lse2, delta, k_base, v_base, stride_kl, stride_vl, 0, n_full, n_keys,
                         kpm_base, qk_scale, dp_scale, offs_n, offs_d, HEAD_DIM, EVEN_D, BLOCK_N, False, False)
        dq = bwd_dq_keys(dq, q, do, lse2, delta, k_base, v_base, stride_kl, stride_vl, n_full, n_keys, n_keys,
                         kpm_base, qk_scale, dp_scale, offs_n, offs_d, HEAD_DIM, EVEN_D, BLOCK_N, True, False)
    return dq


@triton.jit
def bwd_dkdv_queries(dk, dv, k, v, key_ok, q_base, do_base, lse_base, delta_base, stride_ql, stride_dol,
                     stride_ll, n_q, qk_scale, dp_scale, offs_m, offs_d, HEAD_DIM: tl.constexpr,
                     EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, MASK_KEYS: tl.constexpr):
    """For one key tile, stream all queries [0, n_q) of its sequence:

    Pᵀ = exp2(K·Qᵀ − lse2),  dV += Pᵀ·dO,  dSᵀ = Pᵀ ⊙ (dp_scale·V·dOᵀ − D),  dK += dSᵀ·Q.
    Query rows past n_q read lse2 = +inf, hence Pᵀ = 0. The caller scales dV by dp_scale and dK by τ.
    """
    for start in range(0, n_q, BLOCK_M):
        rows = start + offs_m
        row_ok = rows < n_q
        q = load_rows(q_base, rows, row_ok, stride_ql, offs_d, HEAD_DIM, EVEN_D)
        do = load_rows(do_base, rows, row_ok, stride_dol, offs_d, HEAD_DIM, EVEN_D)
        lse2 = load_lse2(lse_base + rows * stride_ll, row_ok)
        delta = tl.load(delta_base + rows * stride_ll, mask=row_ok, other=0.0)
        p_t = tl.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse2[None, :])
        if MASK_KEYS:
            p_t = tl.where(key_ok[:, None], p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv)
        dp_t = tl.dot(v, tl.trans(do)) * dp_scale
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk)
    return dk, dv


# ----------------------------------------------------------------------------------------------------------
# Kernels: batched / packed attention
# ----------------------------------------------------------------------------------------------------------

_FWD_CONFIGS = configs(
    gpu=[
        cfg(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
        cfg(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
        cfg(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
        cfg(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    ],
    interpreter=cfg(BLOCK_M=32, BLOCK_N=16),
)
_BWD_DQ_CONFIGS = configs(
    gpu=[
        cfg(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3),
        cfg(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
        cfg(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2),
    ],
    interpreter=cfg(BLOCK_M=32, BLOCK_N=16),
)
_BWD_DKDV_CONFIGS = configs(
    gpu=[
        cfg(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=3),
        cfg(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
        cfg(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=2),
    ],
    interpreter=cfg(BLOCK_M=16, BLOCK_N=32),
)
_TUNE_KEY = ["HEAD_DIM", "IS_VARLEN", "HAS_KPM"]


@triton.jit
def _sequence_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, IS_VARLEN: tl.constexpr):
    """(first query row, query count, first key row, key count) of sample b."""
    if IS_VARLEN:
        q_start = tl.load(CU_Q + b)
        n_q = tl.load(CU_Q + b + 1) - q_start
        k_start = tl.load(CU_K + b)
        n_k = tl.load(CU_K + b + 1) - k_start
    else:
        q_start = 0
        n_q = seqlen_q
        k_start = 0
        n_k = seqlen_k
    return q_start, n_q, k_start, n_k


@triton.autotune(configs=_FWD_CONFIGS, key=_TUNE_KEY)
@triton.jit
def _attn_fwd(Q, K, V, OUT, LSE, KPM, CU_Q, CU_K,
              stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
              stride_vb, stride_vh, stride_vl, stride_ob, stride_oh, stride_ol,
              stride_lb, stride_lh, stride_ll, stride_mb,
              num_heads, seqlen_q, seqlen_k, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_KPM: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program = BLOCK_M queries of one (sample, head); grid (cdiv(max_seqlen_q, BLOCK_M), B·H)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    q_start, n_q, k_start, n_k = _sequence_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, IS_VARLEN)
    if pid_m * BLOCK_M >= n_q:
        return
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < n_q

    q_base = Q + b * stride_qb + h * stride_qh + q_start * stride_ql
    k_base = K + b * stride_kb + h * stride_kh + k_start * stride_kl
    v_base = V + b * stride_vb + h * stride_vh + k_start * stride_vl
    q = load_rows(q_base, offs_m, row_ok, stride_ql, offs_d, HEAD_DIM, EVEN_D)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = fwd_sequence(acc, m_i, l_i, q, k_base, v_base, stride_kl, stride_vl, n_k, KPM + b * stride_mb,
                                 qk_scale, offs_n, offs_d, HEAD_DIM, EVEN_D, BLOCK_N, HAS_KPM)
    o, lse = finish_softmax(acc, m_i, l_i)

    store_rows(OUT + b * stride_ob + h * stride_oh + q_start * stride_ol, offs_m, row_ok, stride_ol, offs_d, o,
               HEAD_DIM, EVEN_D)
    lse_ptrs = LSE + b * stride_lb + h * stride_lh + (q_start + offs_m) * stride_ll
    tl.store(lse_ptrs, lse, mask=row_ok)


@triton.autotune(configs=_BWD_DQ_CONFIGS, key=_TUNE_KEY)
@triton.jit
def _attn_bwd_dq(Q, K, V, OUT, DO, DQ, LSE, DELTA, KPM, CU_Q, CU_K,
                 stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
                 stride_vb, stride_vh, stride_vl, stride_ob, stride_oh, stride_ol,
                 stride_dob, stride_doh, stride_dol, stride_dqb, stride_dqh, stride_dql,
                 stride_lb, stride_lh, stride_ll, stride_mb,
                 num_heads, seqlen_q, seqlen_k, sm_scale, qk_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_KPM: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program = BLOCK_M queries: D = rowsum(dO ⊙ O) (stored for the dK/dV kernel) and dQ."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    q_start, n_q, k_start, n_k = _sequence_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, IS_VARLEN)
    if pid_m * BLOCK_M >= n_q:
        return
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < n_q

    q = load_rows(Q + b * stride_qb + h * stride_qh + q_start * stride_ql, offs_m, row_ok, stride_ql, offs_d,
                  HEAD_DIM, EVEN_D)
    do = load_rows(DO + b * stride_dob + h * stride_doh + q_start * stride_dol, offs_m, row_ok, stride_dol,
                   offs_d, HEAD_DIM, EVEN_D)
    o = load_rows(OUT + b * stride_ob + h * stride_oh + q_start * stride_ol, offs_m, row_ok, stride_ol, offs_d,
                  HEAD_DIM, EVEN_D)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    row_off = b * stride_lb + h * stride_lh + (q_start + offs_m) * stride_ll
    tl.store(DELTA + row_off, delta, mask=row_ok)
    lse2 = load_lse2(LSE + row_off, row_ok)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = bwd_dq_sequence(dq, q, do, lse2, delta, K + b * stride_kb + h * stride_kh + k_start * stride_kl,
                         V + b * stride_vb + h * stride_vh + k_start * stride_vl, stride_kl, stride_vl, n_k,
                         KPM + b * stride_mb, qk_scale, 1.0, offs_n, offs_d, HEAD_DIM, EVEN_D, BLOCK_N, HAS_KPM)
    store_rows(DQ + b * stride_dqb + h * stride_dqh + q_start * stride_dql, offs_m, row_ok, stride_dql, offs_d,
               dq * sm_scale, HEAD_DIM, EVEN_D)


@triton.autotune(configs=_BWD_DKDV_CONFIGS, key=_TUNE_KEY)
@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, KPM, CU_Q, CU_K,
                   stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
                   stride_vb, stride_vh, stride_vl, stride_dob, stride_doh, stride_dol,
                   stride_dkb, stride_dkh, stride_dkl, stride_dvb, stride_dvh, stride_dvl,
                   stride_lb, stride_lh, stride_ll, stride_mb,
                   num_heads, seqlen_q, seqlen_k, sm_scale, qk_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_VARLEN: tl.constexpr,
                   HAS_KPM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program = BLOCK_N keys of one (sample, head): dK and dV, streaming the sample's queries."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    q_start, n_q, k_start, n_k = _sequence_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, IS_VARLEN)
    if pid_n * BLOCK_N >= n_k:
        return
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < n_k
    key_ok = col_ok
    if HAS_KPM:
        key_ok = col_ok & (tl.load(KPM + b * stride_mb + offs_n, mask=col_ok, other=0) != 0)

    k = load_rows(K + b * stride_kb + h * stride_kh + k_start * stride_kl, offs_n, col_ok, stride_kl, offs_d,
                  HEAD_DIM, EVEN_D)
    v = load_rows(V + b * stride_vb + h * stride_vh + k_start * stride_vl, offs_n, col_ok, stride_vl, offs_d,
                  HEAD_DIM, EVEN_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    row_base = b * stride_lb + h * stride_lh + q_start * stride_ll
    dk, dv = bwd_dkdv_queries(dk, dv, k, v, key_ok, Q + b * stride_qb + h * stride_qh + q_start * stride_ql,
                              DO + b * stride_dob + h * stride_doh + q_start * stride_dol, LSE + row_base,
                              DELTA + row_base, stride_ql, stride_dol, stride_ll, n_q, qk_scale, 1.0, offs_m,
                              offs_d, HEAD_DIM, EVEN_D, BLOCK_M, HAS_KPM)
    store_rows(DK + b * stride_dkb + h * stride_dkh + k_start * stride_dkl, offs_n, col_ok, stride_dkl, offs_d,
               dk * sm_scale, HEAD_DIM, EVEN_D)
    store_rows(DV + b * stride_dvb + h * stride_dvh + k_start * stride_dvl, offs_n, col_ok, stride_dvl, offs_d,
               dv, HEAD_DIM, EVEN_D)


# ----------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------


def head_block(head_dim: int) -> int:
    """Padded head-dim tile: the next power of two, at least 16 (tl.dot needs K ≥ 16)."""
    return max(16, triton.next_power_of_2(head_dim))


def bhl_strides(t: torch.Tensor, packed: bool) -> tuple[int, int, int]:
    """(batch, head, token) strides of [B, H, L, ...] or packed [T, H, ...] (batch stride 0 when packed)."""
    if packed:
        return 0, t.stride(1), t.stride(0)
    return t.stride(0), t.stride(1), t.stride(2)


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The kernels index the head dim with unit stride; other strides are free."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _dims(q: torch.Tensor, k: torch.Tensor, cu_seqlens_q: torch.Tensor | None, max_seqlen_q: int,
          max_seqlen_k: int) -> tuple[bool, int, int, int, int]:
    """(packed, batch, heads, grid length for queries, grid length for keys)."""
    if cu_seqlens_q is not None:
        return True, cu_seqlens_q.numel() - 1, q.shape[1], max_seqlen_q, max_seqlen_k
    return False, q.shape[0], q.shape[1], q.shape[2], k.shape[2]


def _aux(q: torch.Tensor, key_padding_mask: torch.Tensor | None, cu_seqlens_q: torch.Tensor | None,
         cu_seqlens_k: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Kernel pointers for the optional inputs (q stands in for absent ones; the kernel never reads them)."""
    kpm = q if key_padding_mask is None else last_dim_contiguous(key_padding_mask.view(torch.uint8))
    stride_mb = 0 if key_padding_mask is None else kpm.stride(0)
    cu_q = q if cu_seqlens_q is None else cu_seqlens_q
    cu_k = q if cu_seqlens_k is None else cu_seqlens_k
    return kpm, cu_q, cu_k, stride_mb


def flash_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            key_padding_mask: torch.Tensor | None, cu_seqlens_q: torch.Tensor | None,
                            cu_seqlens_k: torch.Tensor | None, max_seqlen_q: int, max_seqlen_k: int,
                            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel; returns (o, lse) with lse fp32 shaped like q without its last dim."""
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    packed, batch, heads, grid_q, grid_k = _dims(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    if out.numel() == 0 or grid_q == 0:
        return out, lse
    kpm, cu_q, cu_k, stride_mb = _aux(q, key_padding_mask, cu_seqlens_q, cu_seqlens_k)
    head_dim = q.shape[-1]
    grid = lambda meta: (triton.cdiv(grid_q, meta["BLOCK_M"]), batch * heads)
    _attn_fwd[grid](
        q, k, v, out, lse, kpm, cu_q, cu_k,
        *bhl_strides(q, packed), *bhl_strides(k, packed), *bhl_strides(v, packed), *bhl_strides(out, packed),
        *bhl_strides(lse, packed), stride_mb,
        heads, grid_q, grid_k, scale * LOG2E,
        HEAD_DIM=head_dim, BLOCK_D=head_block(head_dim), IS_VARLEN=packed, HAS_KPM=key_padding_mask is not None,
    )
    return out, lse


def flash_attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             out: torch.Tensor, lse: torch.Tensor, key_padding_mask: torch.Tensor | None,
                             cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None,
                             max_seqlen_q: int, max_seqlen_k: int,
                             scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the dQ kernel (which also writes D = rowsum(dO ⊙ O)), then the dK/dV kernel."""
    do, q, k, v = (last_dim_contiguous(t) for t in (do, q, k, v))
    packed, batch, heads, grid_q, grid_k = _dims(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    if grid_q == 0 or grid_k == 0 or q.numel() == 0 or k.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    # Every row of a (packed) sequence is written: dQ by its query tile, dK/dV by its key tile.
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    delta = torch.empty_like(lse)
    kpm, cu_q, cu_k, stride_mb = _aux(q, key_padding_mask, cu_seqlens_q, cu_seqlens_k)
    head_dim = q.shape[-1]
    common = dict(HEAD_DIM=head_dim, BLOCK_D=head_block(head_dim), IS_VARLEN=packed,
                  HAS_KPM=key_padding_mask is not None)
    sizes = (heads, grid_q, grid_k, scale, scale * LOG2E)
    _attn_bwd_dq[lambda meta: (triton.cdiv(grid_q, meta["BLOCK_M"]), batch * heads)](
        q, k, v, out, do, dq, lse, delta, kpm, cu_q, cu_k,
        *bhl_strides(q, packed), *bhl_strides(k, packed), *bhl_strides(v, packed), *bhl_strides(out, packed),
        *bhl_strides(do, packed), *bhl_strides(dq, packed), *bhl_strides(lse, packed), stride_mb,
        *sizes, **common,
    )
    _attn_bwd_dkdv[lambda meta: (triton.cdiv(grid_k, meta["BLOCK_N"]), batch * heads)](
        q, k, v, do, dk, dv, lse, delta, kpm, cu_q, cu_k,
        *bhl_strides(q, packed), *bhl_strides(k, packed), *bhl_strides(v, packed), *bhl_strides(do, packed),
        *bhl_strides(dk, packed), *bhl_strides(dv, packed), *bhl_strides(lse, packed), stride_mb,
        *sizes, **common,
    )
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------------
# Custom ops: torch.compile sees one opaque op per direction, autograd connects them
# ----------------------------------------------------------------------------------------------------------


@torch.library.custom_op("mglab::flash_attn_fwd", mutates_args=())
def flash_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None,
                   cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None, max_seqlen_q: int,
                   max_seqlen_k: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse) of softmax attention; see the module docstring for layouts and masking."""
    return flash_attention_forward(q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                   max_seqlen_k, scale)


@flash_attn_fwd.register_fake
def _(q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("mglab::flash_attn_bwd", mutates_args=())
def flash_attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, key_padding_mask: torch.Tensor | None, cu_seqlens_q: torch.Tensor | None,
                   cu_seqlens_k: torch.Tensor | None, max_seqlen_q: int, max_seqlen_k: int,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) given dO and the forward's (o, lse)."""
    return flash_attention_backward(do, q, k, v, out, lse, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                                    max_seqlen_q, max_seqlen_k, scale)


@flash_attn_bwd.register_fake
def _(do, q, k, v, out, lse, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, cu_seqlens_q, cu_seqlens_k)
    ctx.sizes = (max_seqlen_q, max_seqlen_k, scale)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout: torch.Tensor, _dlse: torch.Tensor | None):
    q, k, v, out, lse, key_padding_mask, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    dq, dk, dv = flash_attn_bwd(dout, q, k, v, out, lse, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                                *ctx.sizes)
    return dq, dk, dv, None, None, None, None, None, None


flash_attn_fwd.register_autograd(_backward, setup_context=_setup_context)
