"""Fused RMSNorm with optional adaLN modulation in Triton, forward and backward.

For a row x ∈ R^C (optional weight w, modulation scale s and shift t broadcast to x):

    r = 1 / sqrt(mean(x²) + eps),   n = x·r,   y = n·w·(1 + s) + t.

Backward, with g = dy·(1 + s)·w the gradient reaching n:

    dx = r·(g − n·mean(g ⊙ n)),   dw = Σ_rows dy·(1 + s)·n,   ds = Σ dy·n·w,   dt = Σ dy,

where the sums for s and t run over the rows that share a modulation row (all tokens of a sample for
DiT's per-sample adaLN [B, 1, C]; none for per-token modulation [B, L, C]).

x is [B, L, C] (or [N, C], treated as [1, N, C]); s, t broadcast to it. One program handles ROWS rows of one
sample, so per-sample reductions stay in registers; each program writes one fp32 partial per reduction,
summed on the host (no atomics). Statistics are fp32; y and dx are stored in x's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.runtime import INTERPRETING


@triton.jit
def _rms_norm_fwd(X, W, S, T, Y, RSTD,
                  stride_xb, stride_xl, stride_sb, stride_sl, stride_tb, stride_tl,
                  seq_len, n_cols, eps,
                  HAS_W: tl.constexpr, HAS_S: tl.constexpr, HAS_T: tl.constexpr, ROWS: tl.constexpr,
                  BLOCK_C: tl.constexpr):
    """Grid (B, cdiv(L, ROWS)). Y is contiguous [B, L, C]; RSTD [B, L] fp32 keeps r for the backward."""
    b = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < n_cols
    if HAS_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    for i in range(ROWS):
        row = tl.program_id(1) * ROWS + i
        ok = cols < tl.where(row < seq_len, n_cols, 0)  # (a vector & scalar mask trips the interpreter)
        x = tl.load(X + b * stride_xb + row * stride_xl + cols, mask=ok, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / n_cols + eps)
        y = x * rstd
        if HAS_W:
            y = y * w
        if HAS_S:
            y = y * (1.0 + tl.load(S + b * stride_sb + row * stride_sl + cols, mask=ok, other=0.0).to(tl.float32))
        if HAS_T:
            y = y + tl.load(T + b * stride_tb + row * stride_tl + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(Y + (b * seq_len + row) * n_cols + cols, y.to(Y.dtype.element_ty), mask=ok)
        tl.store(RSTD + b * seq_len + row, rstd, mask=row < seq_len)


@triton.jit
def _rms_norm_bwd(DY, X, W, S, RSTD, DX, DW_PART, DS, DT,
                  stride_xb, stride_xl, stride_sb, stride_sl,
                  seq_len, n_cols, n_chunks,
                  HAS_W: tl.constexpr, HAS_S: tl.constexpr, HAS_T: tl.constexpr, S_PER_ROW: tl.constexpr,
                  T_PER_ROW: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """Grid (B, n_chunks). DY, DX contiguous [B, L, C]. Partials, fp32 with C columns: DW_PART and the
    per-sample DS/DT one row per program ([B, n_chunks, C]); per-row DS/DT one row per token ([B, L, C])."""
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < n_cols
    w = 1.0
    if HAS_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    ds_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    dt_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for i in range(ROWS):
        row = chunk * ROWS + i
        ok = cols < tl.where(row < seq_len, n_cols, 0)
        tok = (b * seq_len + row) * n_cols
        dy = tl.load(DY + tok + cols, mask=ok, other=0.0).to(tl.float32)
        x = tl.load(X + b * stride_xb + row * stride_xl + cols, mask=ok, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + b * seq_len + row, mask=row < seq_len, other=0.0)
        n = x * rstd
        g = dy
        if HAS_S:
            s = tl.load(S + b * stride_sb + row * stride_sl + cols, mask=ok, other=0.0).to(tl.float32)
            ds_row = dy * n * w
            if S_PER_ROW:
                tl.store(DS + tok + cols, ds_row, mask=ok)
            else:
                ds_acc += ds_row
            g = g * (1.0 + s)
        if HAS_T:
            if T_PER_ROW:
                tl.store(DT + tok + cols, dy, mask=ok)
            else:
                dt_acc += dy
        dw_acc += g * n
        g = g * w
        dx = rstd * (g - n * (tl.sum(g * n, 0) / n_cols))
        tl.store(DX + tok + cols, dx.to(DX.dtype.element_ty), mask=ok)
    part = (b * n_chunks + chunk) * n_cols + cols
    if HAS_W:
        tl.store(DW_PART + part, dw_acc, mask=col_ok)
    if HAS_S and not S_PER_ROW:
        tl.store(DS + part, ds_acc, mask=col_ok)
    if HAS_T and not T_PER_ROW:
        tl.store(DT + part, dt_acc, mask=col_ok)


def _as_3d(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 2:
        return x.unsqueeze(0)
    if x.dim() != 3:
        raise ValueError(f"rms_norm expects x of shape [B, L, C] or [N, C], got {tuple(x.shape)}")
    return x


def _modulation(m: torch.Tensor | None, x: torch.Tensor) -> tuple[torch.Tensor | None, int, int]:
    """Broadcast a scale/shift to x and view it as [B, L, C] (no copy); returns (view, batch stride, row stride).

    A stride of 0 marks a broadcast dim: row stride 0 = one modulation row per sample (adaLN)."""
    if m is None:
        return None, 0, 0
    m3 = _as_3d(m.expand_as(x)) if m.stride(-1) == 1 else _as_3d(m.contiguous().expand_as(x))
    return m3, m3.stride(0), m3.stride(1)


def _launch_shape(x3: torch.Tensor) -> tuple[int, int, int]:
    """(rows per program, warps, BLOCK_C)."""
    block_c = triton.next_power_of_2(x3.shape[-1])
    rows = 4 if INTERPRETING else 16
    return min(rows, max(1, x3.shape[1])), (8 if block_c >= 4096 else 4), block_c


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor | None, scale: torch.Tensor | None,
                     shift: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward; returns (y shaped like x, rstd [B, L] fp32)."""
    x3 = _as_3d(x if x.stride(-1) == 1 else x.contiguous())
    weight = None if weight is None else weight.contiguous()
    batch, seq_len, n_cols = x3.shape
    y = torch.empty(x3.shape, dtype=x.dtype, device=x.device)
    rstd = torch.empty((batch, seq_len), dtype=torch.float32, device=x.device)
    if y.numel() == 0:
        return y.view(x.shape), rstd
    s3, ssb, ssl = _modulation(scale, x)
    t3, stb, stl = _modulation(shift, x)
    rows, warps, block_c = _launch_shape(x3)
    _rms_norm_fwd[(batch, triton.cdiv(seq_len, rows))](
        x3, x3 if weight is None else weight, x3 if s3 is None else s3, x3 if t3 is None else t3, y, rstd,
        x3.stride(0), x3.stride(1), ssb, ssl, stb, stl, seq_len, n_cols, eps,
        HAS_W=weight is not None, HAS_S=scale is not None, HAS_T=shift is not None, ROWS=rows, BLOCK_C=block_c,
        num_warps=warps,
    )
    return y.view(x.shape), rstd


def _reduce(part: torch.Tensor, per_row: bool, like: torch.Tensor) -> torch.Tensor:
    """Per-program or per-row partial [B, ·, C] → gradient of a modulation tensor of ``like``'s shape."""
    summed = part if per_row else part.sum(1, keepdim=True)
    return summed.sum_to_size(like.shape).to(like.dtype)


def rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, scale: torch.Tensor | None,
                      shift: torch.Tensor | None, rstd: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward; returns (dx, dweight, dscale, dshift), empty tensors for absent inputs."""
    x3 = _as_3d(x if x.stride(-1) == 1 else x.contiguous())
    dy3 = _as_3d(dy.contiguous())
    weight = None if weight is None else weight.contiguous()
    batch, seq_len, n_cols = x3.shape
    s3, ssb, ssl = _modulation(scale, x)
    _, _, stl = _modulation(shift, x)
    s_per_row = scale is not None and ssl != 0
    t_per_row = shift is not None and stl != 0
    rows, warps, block_c = _launch_shape(x3)
    n_chunks = triton.cdiv(seq_len, rows)
    part = lambda per_row: torch.empty((batch, seq_len if per_row else n_chunks, n_cols), dtype=torch.float32,
                                       device=x.device)
    dx = torch.empty(x3.shape, dtype=x.dtype, device=x.device)
    dw_part = part(False) if weight is not None else x3.new_empty(0, dtype=torch.float32)
    ds = part(s_per_row) if scale is not None else x3.new_empty(0, dtype=torch.float32)
    dt = part(t_per_row) if shift is not None else x3.new_empty(0, dtype=torch.float32)
    if x3.numel() > 0:
        _rms_norm_bwd[(batch, n_chunks)](
            dy3, x3, x3 if weight is None else weight, x3 if s3 is None else s3, rstd, dx,
            dw_part if weight is not None else dx, ds if scale is not None else dx, dt if shift is not None else dx,
            x3.stride(0), x3.stride(1), ssb, ssl, seq_len, n_cols, n_chunks,
            HAS_W=weight is not None, HAS_S=scale is not None, HAS_T=shift is not None, S_PER_ROW=s_per_row,
            T_PER_ROW=t_per_row, ROWS=rows, BLOCK_C=block_c, num_warps=warps,
        )
    dweight = dw_part.sum((0, 1)).to(weight.dtype) if weight is not None else x.new_empty(0)
    dscale = _reduce(ds, s_per_row, scale) if scale is not None else x.new_empty(0)
    dshift = _reduce(dt, t_per_row, shift) if shift is not None else x.new_empty(0)
    return dx.view(x.shape), dweight, dscale, dshift


# ----------------------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------------------


@torch.library.custom_op("mglab::rms_norm_fwd", mutates_args=())
def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor | None, scale: torch.Tensor | None,
                 shift: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, rstd) of the modulated RMSNorm; see the module docstring."""
    return rms_norm_forward(x, weight, scale, shift, eps)


@rms_norm_fwd.register_fake
def _(x, weight, scale, shift, eps):
    x3 = _as_3d(x)
    return x.new_empty(x.shape), x.new_empty(x3.shape[:2], dtype=torch.float32)


@torch.library.custom_op("mglab::rms_norm_bwd", mutates_args=())
def rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, scale: torch.Tensor | None,
                 shift: torch.Tensor | None, rstd: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dscale, dshift); empty tensors stand for absent inputs."""
    return rms_norm_backward(dy, x, weight, scale, shift, rstd)


@rms_norm_bwd.register_fake
def _(dy, x, weight, scale, shift, rstd):
    like = lambda t: x.new_empty(0) if t is None else t.new_empty(t.shape)
    return x.new_empty(x.shape), like(weight), like(scale), like(shift)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, scale, shift, eps = inputs
    ctx.save_for_backward(x, weight, scale, shift, output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dy, _drstd):
    x, weight, scale, shift, rstd = ctx.saved_tensors
    dx, dweight, dscale, dshift = rms_norm_bwd(dy, x, weight, scale, shift, rstd)
    return (dx, dweight if weight is not None else None, dscale if scale is not None else None,
            dshift if shift is not None else None, None)


rms_norm_fwd.register_autograd(_backward, setup_context=_setup_context)
