"""The attention entry point of every model: multi-head attention over kernels' Triton / PyTorch ops.

Models call ``attend`` (heads already split) or use the ``Attention`` module (projections included). Both
run ``kernels.attention`` / ``kernels.varlen_attention`` / ``kernels.guided_attention``. ``backend="auto"``:
dense attention (self, cross, with a padding mask) goes to PyTorch SDPA (cuDNN / flash on GPU); packed and
guided attention to our Triton kernels on CUDA (SDPA has no varlen or guided form), PyTorch elsewhere.
``"triton"`` runs our kernels for all of them (on CPU it needs ``TRITON_INTERPRET=1``), ``"torch"`` PyTorch
only. Models expose it as a constructor argument (``DiT(attention_backend=...)``, ``model.net.attention_backend``
in a config).

Attention is softmax(QKᵀ/sqrt(d))·V, non-causal (Movie Gen and the U-Nets attend bidirectionally):
- self-attention: keys from x; cross-attention: keys from ``context`` (text), with an optional
  ``key_padding_mask`` [B, Lc] (True = real token);
- segmented cross-attention (``context_segments``): the context is consecutive segments (the text, then extra
  token groups such as a reference image's), each with its own softmax, their outputs summed (see
  ``Attention.forward``);
- packed: x is [T, C] with ``cu_seqlens`` (and the context [Tc, Cc] with ``cu_seqlens_context``), each
  sample attending only to itself, no padding;
- AVID middle-frame guidance (``FrameGuidance``): frame-major tokens, each frame attends to itself and to
  an anchor frame (blend or concat, see ``kernels.guided_attention``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange
from torch import nn

import kernels
from kernels import Backend


@dataclass
class FrameGuidance:
    """Middle-frame attention guidance for frame-major tokens (frame f = rows [f·S, (f + 1)·S)).

    frame_len: tokens per frame S. weight: ω of the blend (1 − ω)·Attn(own) + ω·Attn(anchor).
    mode: "blend" or "concat" (one softmax over own + anchor keys). anchor_kv: cached (k, v) [B, H, S_a, D] of
    the anchor frame (e.g. from ``Attention.project_kv`` on the middle frame); None takes the keys of
    ``anchor_frame`` in this clip, whose queries then see their own frame only.
    """

    frame_len: int
    weight: float = 0.4
    mode: str = "blend"
    anchor_frame: int | None = None
    anchor_kv: tuple[torch.Tensor, torch.Tensor] | None = None

    def anchor(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_a, v_a): the cached pair, or views of frame ``anchor_frame`` of k, v [B, H, F·S, D]."""
        if self.anchor_kv is not None:
            return self.anchor_kv
        if self.anchor_frame is None:
            raise ValueError("FrameGuidance needs anchor_kv or anchor_frame")
        rows = slice(self.anchor_frame * self.frame_len, (self.anchor_frame + 1) * self.frame_len)
        return k[:, :, rows], v[:, :, rows]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, key_padding_mask: torch.Tensor | None = None,
           guidance: FrameGuidance | None = None, scale: float | None = None,
           backend: Backend = "auto") -> torch.Tensor:
    """softmax(scale·QKᵀ)·V for q [B, H, Lq, D], k, v [B, H, Lk, D] → [B, H, Lq, D], optionally frame-guided."""
    if guidance is None:
        return kernels.attention(q, k, v, key_padding_mask=key_padding_mask, scale=scale, backend=backend)
    if key_padding_mask is not None:
        raise ValueError("attend: key_padding_mask and frame guidance do not combine")
    k_a, v_a = guidance.anchor(k, v)
    return kernels.guided_attention(q, k, v, k_a, v_a, frame_len=guidance.frame_len, weight=guidance.weight,
                                    mode=guidance.mode, anchor_frame=guidance.anchor_frame, scale=scale,
                                    backend=backend)


def rotary_angles(grid: Sequence[int], head_dim: int, theta: float = 100.0,
                  frame_offset: torch.Tensor | None = None) -> torch.Tensor:
    """Angles of 3D axial rotary position embeddings (RoPE, Su et al. 2021) for a (t, h, w) token grid in the
    order t, then h, then w: [N, head_dim / 2], or [B, N, head_dim / 2] with frame_offset [B] (temporal positions
    offset_b + 0 .. t − 1).

    The head dim is split into three even parts, one per axis (t gets what does not divide by 3); a part of 2m
    dims rotates its m pairs by pos · theta^(−i/m), i < m. A small theta suits small grids: with 100 and m = 4
    the fastest pair turns 1 rad per position and the slowest 0.03."""
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head dim, got {head_dim}")
    pairs = head_dim // 2
    split = [pairs - 2 * (pairs // 3), pairs // 3, pairs // 3]
    t, h, w = (int(g) for g in grid)
    device = None if frame_offset is None else frame_offset.device
    axes = [torch.arange(n, device=device, dtype=torch.float32) for n in (t, h, w)]
    if frame_offset is not None:
        axes[0] = frame_offset.float()[:, None] + axes[0]
    parts = []
    for axis, (positions, m) in enumerate(zip(axes, split)):
        if m == 0:
            continue
        freqs = theta ** (-torch.arange(m, device=device, dtype=torch.float32) / m)
        angles = positions[..., None] * freqs  # [n, m] or [B, t, m]
        shape = [t, h, w]
        view = [1, 1, 1]
        view[axis] = shape[axis]
        lead = angles.shape[:-2]
        angles = angles.reshape(*lead, *view, m).expand(*lead, t, h, w, m)
        parts.append(angles)
    parts = [part.expand(*parts[0].shape[:-1], part.shape[-1]) for part in parts]  # the batch of frame_offset
    return rearrange(torch.cat(parts, dim=-1), "... t h w m -> ... (t h w) m")


def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """x [B, H, N, D] with its pairs (x_2i, x_2i+1) turned by angles [N, D/2] or [B, N, D/2]:
    (a cos θ − b sin θ, a sin θ + b cos θ). q·k of rotated vectors depends on their positions' difference only.

    Computed as one complex product (a + ib)·e^(iθ) in float32: on a CPU ~4x faster, forward and backward, than
    the four real products over the pairs' strided halves (~5% of a quickstart step)."""
    if angles.ndim == 3:
        angles = angles[:, None]
    pairs = torch.view_as_complex(rearrange(x.float(), "... (m two) -> ... m two", two=2).contiguous())
    turned = torch.view_as_real(pairs * torch.polar(torch.ones_like(angles), angles))
    return rearrange(turned, "... m two -> ... (m two)").to(x.dtype)


class Attention(nn.Module):
    """Multi-head (self or cross) attention: Q from x, K/V from x or ``context``, optional QK RMSNorm.

    out = W_o · concat_h softmax(q_h k_hᵀ / sqrt(d)) v_h, with q = W_q x, k = W_k s, v = W_v s (s = context or x).

    Heads are read from the projections' widths (head_dim fixed), so a tensor-parallel copy whose projections
    hold only its share of the heads runs unchanged (`lightning_modules.model_parallel`). `kv_hook`, when set
    from outside, maps the (k, v) of self-attention before attending: context parallelism all-gathers them there.
    """

    def __init__(self, dim: int, heads: int, *, context_dim: int | None = None, head_dim: int | None = None,
                 qk_norm: bool = False, bias: bool = False, backend: Backend = "auto") -> None:
        super().__init__()
        if head_dim is None:
            if dim % heads:
                raise ValueError(f"Attention: dim {dim} does not split into {heads} heads; pass head_dim")
            head_dim = dim // heads
        self.heads, self.head_dim, self.backend = heads, head_dim, backend
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=bias)
        self.to_out = nn.Linear(inner, dim, bias=bias)
        self.kv_hook: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
        self.q_norm = nn.Parameter(torch.ones(head_dim)) if qk_norm else None
        self.k_norm = nn.Parameter(torch.ones(head_dim)) if qk_norm else None

    def init_weights(self) -> None:
        """PyTorch's default for the projections, 1 for the QK-norm weights (the meta-init contract of
        `lightning_modules.parallel`; networks that want another scheme re-initialise the projections after)."""
        for layer in (self.to_q, self.to_k, self.to_v, self.to_out):
            layer.reset_parameters()
        for weight in (self.q_norm, self.k_norm):
            if weight is not None:
                nn.init.ones_(weight)

    def _norm(self, t: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        """RMSNorm over the head dim of [..., D] (QK-norm), through the fused kernel."""
        if weight is None:
            return t
        flat = kernels.rms_norm(t.reshape(-1, t.shape[-1]), weight, backend=self.backend)
        return flat.view(t.shape)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        # Checkpoints from before the K and V projections were split hold one fused `to_kv` ([k; v] rows).
        for kind in ("weight", "bias"):
            fused = state_dict.pop(f"{prefix}to_kv.{kind}", None)
            if fused is not None:
                state_dict[f"{prefix}to_k.{kind}"], state_dict[f"{prefix}to_v.{kind}"] = fused.chunk(2, dim=0)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def project_kv(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) [B, H, L, D] of source [B, L, C] (e.g. the anchor frame's tokens, to cache for guidance)."""
        k = rearrange(self.to_k(source), "b l (h d) -> b h l d", d=self.head_dim)
        v = rearrange(self.to_v(source), "b l (h d) -> b h l d", d=self.head_dim)
        return self._norm(k, self.k_norm), v

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *,
                key_padding_mask: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                cu_seqlens_context: torch.Tensor | None = None, max_seqlen: int | None = None,
                max_seqlen_context: int | None = None, guidance: FrameGuidance | None = None,
                context_segments: Sequence[int] | None = None, rotary: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, L, C] → [B, L, C]; packed: x [T, C] with cu_seqlens (context [Tc, Cc] with cu_seqlens_context).

        context_segments (cross-attention): lengths (L_0, L_1, ...) of consecutive segments of the context, each
        attended with its own softmax and the outputs summed (decoupled cross-attention, as IP-Adapter's, with the
        K/V projections shared):

            out = W_o · Σ_s softmax(q K_sᵀ/√d) V_s        K_s, V_s = W_k, W_v of segment s's tokens (and mask)

        A segment with no real token adds 0, and so does one whose tokens are 0 (V_s = W_v·0 = 0, no bias): the
        output is then exactly that of the first segment alone (`conditioning.tokens.ReferenceImage`).

        rotary: self-attention only, angles [L, D/2] or [B, L, D/2] (`rotary_angles`) that turn q and k."""
        source = x if context is None else context
        if rotary is not None and (context is not None or cu_seqlens is not None):
            raise ValueError("Attention: rotary embeddings are for dense self-attention (no context or packing)")
        if context_segments is not None and context is not None and len(context_segments) > 1:
            if cu_seqlens is not None or guidance is not None:
                raise ValueError("Attention: context_segments take neither packed inputs nor guidance")
            q = self._norm(rearrange(self.to_q(x), "b l (h d) -> b h l d", d=self.head_dim), self.q_norm)
            out, start = None, 0
            for length in context_segments:
                k, v = self.project_kv(source[:, start:start + length])
                mask = None if key_padding_mask is None else key_padding_mask[:, start:start + length]
                part = attend(q, k, v, key_padding_mask=mask, backend=self.backend)
                out, start = part if out is None else out + part, start + length
            if start != source.shape[1]:
                raise ValueError(f"Attention: context_segments {list(context_segments)} do not add up to the "
                                 f"context's {source.shape[1]} tokens")
            return self.to_out(rearrange(out, "b h l d -> b l (h d)"))
        if cu_seqlens is not None:
            if key_padding_mask is not None or guidance is not None:
                raise ValueError("Attention: packed inputs take neither key_padding_mask nor guidance")
            cu_k = cu_seqlens if context is None else cu_seqlens_context
            if cu_k is None:
                raise ValueError("Attention: packed cross-attention needs cu_seqlens_context")
            max_k = max_seqlen if context is None else max_seqlen_context
            q = self._norm(rearrange(self.to_q(x), "t (h d) -> t h d", d=self.head_dim), self.q_norm)
            k = rearrange(self.to_k(source), "t (h d) -> t h d", d=self.head_dim)
            v = rearrange(self.to_v(source), "t (h d) -> t h d", d=self.head_dim)
            out = kernels.varlen_attention(q, self._norm(k, self.k_norm), v, cu_seqlens, cu_k,
                                           max_seqlen_q=max_seqlen, max_seqlen_k=max_k, backend=self.backend)
            return self.to_out(rearrange(out, "t h d -> t (h d)"))
        q = self._norm(rearrange(self.to_q(x), "b l (h d) -> b h l d", d=self.head_dim), self.q_norm)
        k, v = self.project_kv(source)
        if rotary is not None:
            q, k = rotate(q, rotary), rotate(k, rotary)
        if self.kv_hook is not None and context is None:
            k, v = self.kv_hook(k, v)
        out = attend(q, k, v, key_padding_mask=key_padding_mask, guidance=guidance, backend=self.backend)
        return self.to_out(rearrange(out, "b h l d -> b l (h d)"))


class MiddleFrameAnchors:
    """AVID's middle-frame attention guidance across temporal windows (the spatial self-attention of a U-Net).

    A sampler that denoises a long clip window by window runs, at every step, the window holding the clip's middle
    frame first, in `record` mode: each hooked self-attention caches (k, v) of that frame (the anchor, from the
    same layer at the same step) and attends as usual. The other windows run in `guide` mode: each of their
    frames f blends its attention with the anchor's (`kernels.guided_attention`, weight ω_a):

        out_f = (1 − ω_a)·softmax(Q_f K_fᵀ/√d)·V_f + ω_a·softmax(Q_f K_midᵀ/√d)·V_mid

    A block holds it in its `anchors` slot (set from outside, e.g. `install_anchors`); one object serves every
    block, each keyed by its attention module.
    """

    def __init__(self, weight: float = 0.4, mode: str = "blend") -> None:
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"MiddleFrameAnchors: weight (ω_a) must be in [0, 1], got {weight}")
        self.weight, self.mode = weight, mode
        self.record_frame: int | None = None
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(self, frame: int) -> None:
        """The next pass caches frame `frame` (of the window) at every hooked layer, replacing the last anchors."""
        self.record_frame = frame
        self.cache.clear()

    def guide(self) -> None:
        """The next passes blend every frame with the cached anchors."""
        self.record_frame = None

    def self_attention(self, attn: Attention, x: torch.Tensor, batch: int) -> torch.Tensor:
        """attn's self-attention of per-frame tokens x [(B·T), N, C] (sample-major) → [(B·T), N, C]."""
        frames, tokens = x.shape[0] // batch, x.shape[1]
        if self.record_frame is not None:
            per_sample = rearrange(x, "(b t) n c -> b t n c", b=batch)
            self.cache[id(attn)] = attn.project_kv(per_sample[:, self.record_frame])
            return attn(x)
        anchor = self.cache.get(id(attn))
        if anchor is None:  # nothing recorded (one window, or a layer the recording pass did not reach)
            return attn(x)
        if anchor[0].shape[0] != batch:
            raise ValueError(f"MiddleFrameAnchors: anchors of batch {anchor[0].shape[0]} cannot guide batch {batch}")
        guidance = FrameGuidance(frame_len=tokens, weight=self.weight, mode=self.mode, anchor_kv=anchor)
        out = attn(rearrange(x, "(b t) n c -> b (t n) c", b=batch), guidance=guidance)
        return rearrange(out, "b (t n) c -> (b t) n c", t=frames)


def install_anchors(net: nn.Module, anchors: MiddleFrameAnchors | None) -> None:
    """Fill (or, with None, empty) the `anchors` slot of every block of `net` that has one."""
    for module in net.modules():
        if hasattr(module, "anchors"):
            module.anchors = anchors
