"""The Movie Gen video transformer (arXiv 2410.13720 §3.1.3): a LLaMa3 block with cross-attention and adaLN.

Input: a latent video x [B, C, T, H, W] (an image is T = 1), the flow time t [B] (0 = noise, 1 = data), the text
sequence P [B, L, dim] (already projected to the model width, see `nn.text.TextConditioner`) with its mask, and
optionally the frame rate fps [B] and channel-concatenated conditioning latents (the spatial upsampler).

    tokens  = Patchify(x)                      3D conv, kernel = stride = (1, 2, 2) → [B, N, dim], N = T·(H/2)·(W/2)
    pe      = E_t[t] + E_h[h] + E_w[w]         factorized learnable absolute tables, summed
    e       = MLP(sinusoid(t)) (+ MLP(sinusoid(fps))) (+ W_p · mean_masked(P) with `pooled_text`; not the paper's)
    m       = Linear(SiLU(e)) → 6·dim          one shared time projection, plus a learnable table per block

    per block (modulation (s1, b1, g1, s2, b2, g2) = table_l + m):
        x = x + pe                                             position embedding added at every layer
        x = x + g1 · SelfAttn(RMSNorm(x)·(1 + s1) + b1)        full bidirectional, no causal mask, no RoPE
        x = x + CrossAttn(RMSNorm(x), P)                       keys / values from the text; not modulated
                                                               (segments of P, e.g. text | reference image, each
                                                               with its own softmax: `nn.attention.Attention`)
        x = x + g2 · SwiGLU(RMSNorm(x)·(1 + s2) + b2)          SwiGLU(x) = W2(SiLU(W1 x) ⊙ W3 x)

    out = Unpatchify(Linear(RMSNorm(x)·(1 + s) + b))          (s, b) = Linear(SiLU(e)); → [B, C, T, H, W]

The gates, the shared time projection, the modulation tables and the output layer start at zero, so every
block starts as the identity on the residual stream (adaLN-Zero) and the model starts by predicting 0.
Attention goes through `nn.attention.Attention` (the kernels' single entry point); the RMSNorm + adaLN is the
fused `kernels.rms_norm`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from einops import rearrange, reduce
from torch import nn

import kernels
from kernels import Backend
from lightning_modules.nn.attention import Attention, rotary_angles


def sinusoidal_embedding(x: torch.Tensor, dim: int, max_period: float = 10000.0, scale: float = 1000.0) -> torch.Tensor:
    """[B] → [B, dim]: (cos(scale·x·f_i), sin(scale·x·f_i)) with f_i = max_period^(−i / (dim/2)), i < dim/2."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device, dtype=torch.float32) / half)
    args = scale * x.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) · w · (1 + scale) + shift (adaLN when scale / shift are given)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def init_weights(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, scale=scale, shift=shift, eps=self.eps)


class SwiGLU(nn.Module):
    """W2(SiLU(W1 x) ⊙ W3 x), hidden width `hidden`."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class TimestepEmbedder(nn.Module):
    """e = W2 · SiLU(W1 · sinusoid(x)) for a scalar per sample (flow time, or frame rate)."""

    def __init__(self, dim: int, frequency_dim: int = 256, scale: float = 1000.0) -> None:
        super().__init__()
        self.frequency_dim, self.scale = frequency_dim, scale
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_embedding(x, self.frequency_dim, scale=self.scale).to(self.mlp[0].weight.dtype))


class PositionEmbedding3D(nn.Module):
    """Factorized learnable absolute positions: pe[t, h, w] = E_t[t] + E_h[h] + E_w[w], in patches."""

    def __init__(self, dim: int, max_t: int, max_h: int, max_w: int) -> None:
        super().__init__()
        self.t = nn.Parameter(torch.empty(max_t, dim))
        self.h = nn.Parameter(torch.empty(max_h, dim))
        self.w = nn.Parameter(torch.empty(max_w, dim))
        self.init_weights()

    def init_weights(self) -> None:
        """Each table ~ N(0, 0.02²)."""
        for table in (self.t, self.h, self.w):
            nn.init.normal_(table, std=0.02)

    @property
    def sizes(self) -> tuple[int, int, int]:
        return self.t.shape[0], self.h.shape[0], self.w.shape[0]

    def forward(self, t: int, h: int, w: int, frame_offset: torch.Tensor | None = None) -> torch.Tensor:
        """[t·h·w, dim] in the token order of `Patchify` (t, then h, then w); with frame_offset [B] (temporal
        patches), [B, t·h·w, dim] whose sample b takes the temporal rows offset_b .. offset_b + t − 1 (Movie Gen
        Edit stage I: an image at a random temporal position, not always the first frame's)."""
        if t > self.t.shape[0] or h > self.h.shape[0] or w > self.w.shape[0]:
            raise ValueError(f"latent grid {t}x{h}x{w} patches exceeds the position tables "
                             f"{self.sizes[0]}x{self.sizes[1]}x{self.sizes[2]} (model.net.max_t/max_h/max_w)")
        spatial = self.h[None, :h, None] + self.w[None, None, :w]
        if frame_offset is None:
            return rearrange(self.t[:t, None, None] + spatial, "t h w d -> (t h w) d")
        rows = frame_offset.to(self.t.device).long()[:, None] + torch.arange(t, device=self.t.device)
        if bool((rows < 0).any()) or bool((rows >= self.t.shape[0]).any()):
            raise ValueError(f"frame_offset {frame_offset.tolist()} + {t} frames exceeds the temporal table "
                             f"({self.t.shape[0]} rows, model.net.max_t)")
        return rearrange(self.t[rows][:, :, None, None] + spatial, "b t h w d -> b (t h w) d")


class Block(nn.Module):
    """One Movie Gen block (see the module docstring)."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, qk_norm: bool = False, eps: float = 1e-6,
                 attention_backend: Backend = "auto") -> None:
        super().__init__()
        self.norm1, self.attn = RMSNorm(dim, eps), Attention(dim, heads, qk_norm=qk_norm, backend=attention_backend)
        self.norm2, self.cross = RMSNorm(dim, eps), Attention(dim, heads, qk_norm=qk_norm, backend=attention_backend)
        self.norm3, self.ffn = RMSNorm(dim, eps), SwiGLU(dim, ffn_dim)
        self.modulation = nn.Parameter(torch.zeros(6, dim))  # per-block table added to the shared projection

    def init_weights(self) -> None:
        """Norms 1, attention as `Attention.init_weights`, SwiGLU linears PyTorch's default, modulation table 0
        (the DiT then re-initialises every linear its own way)."""
        for norm in (self.norm1, self.norm2, self.norm3):
            norm.init_weights()
        self.attn.init_weights()
        self.cross.init_weights()
        for layer in (self.ffn.w1, self.ffn.w2, self.ffn.w3):
            layer.reset_parameters()
        nn.init.zeros_(self.modulation)

    def forward(self, x: torch.Tensor, pe: torch.Tensor, modulation: torch.Tensor, context: torch.Tensor,
                context_mask: torch.Tensor | None = None, context_segments: Sequence[int] | None = None,
                rotary: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, N, dim], pe [N, dim] or [B, N, dim], modulation [B, 6, dim], context [B, L, dim], context_mask bool [B, L];
        context_segments: lengths of the context's segments, each with its own softmax (None: one); rotary:
        the self-attention's rotary angles (`nn.attention.rotary_angles`; None: none)."""
        s1, b1, g1, s2, b2, g2 = (self.modulation + modulation).unsqueeze(2).unbind(1)  # each [B, 1, dim]
        x = x + pe
        x = x + g1 * self.attn(self.norm1(x, scale=s1, shift=b1), rotary=rotary)
        x = x + self.cross(self.norm2(x), context, key_padding_mask=context_mask, context_segments=context_segments)
        return x + g2 * self.ffn(self.norm3(x, scale=s2, shift=b2))


class DiT(nn.Module):
    """The Movie Gen backbone. See the module docstring.

    Args:
        in_channels: latent channels C (16 for the Movie Gen TAE).
        dim, depth, heads, ffn_dim: width, blocks, attention heads, SwiGLU hidden width.
        patch: (k_t, k_h, k_w) of the patchify conv, (1, 2, 2) in the paper.
        max_t, max_h, max_w: position-table sizes in patches (the largest latent grid the model accepts).
        qk_norm: RMSNorm on queries and keys (not in the paper; off by default).
        fps_embedding: add an embedding of the frame rate to the time embedding (the paper writes the fps into
            the prompt instead; both are available, see `conditioning.text.Text.fps_in_text`).
        cond_channels: extra input channels concatenated to x (the upsampler's low-resolution latent); their
            patchify weights start at zero so a model initialised from a text-to-video checkpoint is unchanged.
        out_channels: predicted channels (default in_channels).
        pooled_text: also add a projection of the masked mean of the text sequence to the time embedding, so the
            text steers every block's adaLN modulation (as in SD3 / PixArt-style pooled conditioning; not in Movie
            Gen, which conditions through cross-attention only: off by default). Its weights start at zero.
        rope_theta: also turn the self-attention's queries and keys by 3D axial rotary embeddings of the token's
            (t, h, w) patch position with this base (`nn.attention.rotary_angles`; not in Movie Gen, whose
            positions are the absolute tables alone; None: off). Attention then sees relative offsets from the
            first step: what a shape or a motion is, wherever it is in the clip.
        attention_backend: the kernels of every attention layer (`kernels.Backend`): "auto" = PyTorch SDPA for
            the dense self- and cross-attention (cuDNN / flash on GPU) and our Triton kernels for what SDPA lacks;
            "triton" = our Triton kernels everywhere (CUDA, or the interpreter); "torch" = PyTorch only.
    """

    input_weight = "patchify.weight"  # what `grow_input_channels` widens for new condition channels

    def __init__(self, in_channels: int = 16, dim: int = 64, depth: int = 2, heads: int = 4, ffn_dim: int = 172,
                 patch: Sequence[int] = (1, 2, 2), max_t: int = 8, max_h: int = 16, max_w: int = 16,
                 qk_norm: bool = False, fps_embedding: bool = False, cond_channels: int = 0,
                 out_channels: int | None = None, attention_backend: Backend = "auto", pooled_text: bool = False,
                 rope_theta: float | None = None) -> None:
        super().__init__()
        self.in_channels, self.cond_channels = in_channels, cond_channels
        self.out_channels = out_channels or in_channels
        self.patch = tuple(int(p) for p in patch)
        self.dim, self.depth, self.heads, self.ffn_dim = dim, depth, heads, ffn_dim
        self.rope_theta = rope_theta
        self.patchify = nn.Conv3d(in_channels + cond_channels, dim, kernel_size=self.patch, stride=self.patch)
        self.pos = PositionEmbedding3D(dim, max_t, max_h, max_w)
        self.time = TimestepEmbedder(dim)
        self.fps = TimestepEmbedder(dim, scale=1.0) if fps_embedding else None
        self.text_pool = nn.Linear(dim, dim) if pooled_text else None
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(Block(dim, heads, ffn_dim, qk_norm, attention_backend=attention_backend)
                                    for _ in range(depth))
        self.norm_out = RMSNorm(dim)
        self.modulation_out = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.proj_out = nn.Linear(dim, math.prod(self.patch) * self.out_channels)
        self.init_weights()

    def init_weights(self) -> None:
        """The DiT's whole initialisation (the meta-init contract of `lightning_modules.parallel`: called once in
        `__init__` and again after materialisation on the meta device, also on DTensor shards).

        Position tables ~ N(0, 0.02²), norms 1, Xavier-uniform linears and patchify, zero biases; zero
        (adaLN-Zero) for the per-block modulation tables, the shared time projections, the output layer, the
        fps embedding's last layer, the pooled-text projection and the patchify weights of condition channels."""
        self.pos.init_weights()
        self.norm_out.init_weights()
        for block in self.modules():  # through activation-checkpoint wrappers
            if isinstance(block, Block):
                block.init_weights()
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.patchify.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patchify.bias)
        if self.cond_channels:
            with torch.no_grad():  # zero_ on a slice: DTensors have no rule for `w[...] = 0.0`
                w[:, self.in_channels:].zero_()
        for layer in (self.modulation[-1], self.modulation_out[-1], self.proj_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        if self.fps is not None:
            nn.init.zeros_(self.fps.mlp[-1].weight)
            nn.init.zeros_(self.fps.mlp[-1].bias)
        if self.text_pool is not None:
            nn.init.zeros_(self.text_pool.weight)
            nn.init.zeros_(self.text_pool.bias)

    def grid(self, latent_shape: Sequence[int]) -> tuple[int, int, int]:
        """(t, h, w) in patches of a latent [.., T, H, W]; a clear error when it does not divide."""
        t, h, w = latent_shape[-3:]
        kt, kh, kw = self.patch
        if t % kt or h % kh or w % kw:
            raise ValueError(f"latent T, H, W = {t}, {h}, {w} must be multiples of the patch {self.patch}")
        return t // kt, h // kh, w // kw

    def num_tokens(self, latent_shape: Sequence[int]) -> int:
        return math.prod(self.grid(latent_shape))

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None,
                fps: torch.Tensor | None = None, cond: torch.Tensor | None = None,
                frame_features: torch.Tensor | None = None,
                context_segments: Sequence[int] | None = None, time_embedding: torch.Tensor | None = None,
                frame_offset: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, C, T, H, W], t [B], context [B, L, dim], context_mask bool [B, L] → velocity [B, C_out, T, H, W].
        frame_features [B, T, dim] (one per latent frame) are added to the tokens of their frame (averaged
        over the frames of a patch). context_segments (L_0, L_1, ...): the context is the text (and tokens
        sharing its softmax) followed by token groups with a softmax of their own (`conditioning.Conditions`);
        the pooled text reads the first segment only. time_embedding [B, dim] is added to the time embedding
        (Movie Gen Edit's task vector); frame_offset [B] shifts each sample's temporal positions (see
        `PositionEmbedding3D`)."""
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"DiT expects a latent [B, {self.in_channels}, T, H, W], got {tuple(x.shape)}")
        if context.ndim != 3 or context.shape[-1] != self.dim:
            raise ValueError(f"DiT expects a text context [B, L, {self.dim}], got {tuple(context.shape)}")
        if self.cond_channels:
            if cond is None or cond.shape[1] != self.cond_channels or cond.shape[2:] != x.shape[2:]:
                raise ValueError(f"DiT with cond_channels={self.cond_channels} needs cond [B, {self.cond_channels}, "
                                 f"{', '.join(map(str, x.shape[2:]))}], got {None if cond is None else tuple(cond.shape)}")
            x = torch.cat([x, cond.to(x.dtype)], dim=1)
        gt, gh, gw = self.grid(x.shape)
        tokens = rearrange(self.patchify(x), "b d t h w -> b (t h w) d")
        if frame_features is not None:
            per_patch = reduce(frame_features.to(tokens.dtype), "b (t kt) d -> b t 1 d", "mean", kt=self.patch[0])
            tokens = rearrange(rearrange(tokens, "b (t hw) d -> b t hw d", t=gt) + per_patch, "b t hw d -> b (t hw) d")
        pe = self.pos(gt, gh, gw, frame_offset).to(tokens.dtype)
        rotary = None if self.rope_theta is None else rotary_angles(
            (gt, gh, gw), self.dim // self.heads, self.rope_theta, frame_offset).to(tokens.device)
        emb = self.time(t)
        if time_embedding is not None:
            emb = emb + time_embedding.to(emb.dtype)
        if self.fps is not None:
            emb = emb + self.fps(torch.zeros_like(t) if fps is None else fps.to(t))
        if self.text_pool is not None:
            text = slice(0, context_segments[0] if context_segments else context.shape[1])
            emb = emb + self.text_pool(pooled(context[:, text].to(emb.dtype),
                                              None if context_mask is None else context_mask[:, text]))
        modulation = rearrange(self.modulation(emb), "b (six d) -> b six d", six=6)
        for block in self.blocks:
            tokens = block(tokens, pe, modulation, context.to(tokens.dtype), context_mask, context_segments, rotary)
        shift, scale = self.modulation_out(emb).unsqueeze(1).chunk(2, dim=-1)
        out = self.proj_out(self.norm_out(tokens, scale=scale, shift=shift))
        kt, kh, kw = self.patch
        return rearrange(out, "b (t h w) (c kt kh kw) -> b c (t kt) (h kh) (w kw)", t=gt, h=gh, w=gw, kt=kt, kh=kh, kw=kw)


def pooled(context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of context [B, L, d] over its real tokens (mask bool [B, L], True = real; None: all) → [B, d]."""
    if mask is None:
        return context.mean(dim=1)
    weights = mask.to(context.dtype)[..., None]
    return (context * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def grow_position_tables(state: dict[str, torch.Tensor], model: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """Fit a checkpoint's position tables to `model`'s sizes (stage transitions, Movie Gen §3.2): old rows are
    kept, new rows copy the nearest old row (the last one); tables that shrink are cut. Returns a new dict (the
    same entries for a network without position tables, e.g. the UNet)."""
    state = dict(state)
    if not hasattr(model, "pos"):
        return state
    for axis, size in zip("thw", model.pos.sizes):
        key = f"{prefix}pos.{axis}"
        if key not in state:
            continue
        old = state[key]
        if old.shape[0] < size:
            old = torch.cat([old, old[-1:].expand(size - old.shape[0], -1)], dim=0)
        state[key] = old[:size].clone()
    return state


def grow_input_channels(state: dict[str, torch.Tensor], model: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """Fit a checkpoint's input weights (the parameter `model.input_weight` names: the DiT's patchify, the UNet's
    conv_in) to `model`'s input channels: channels the checkpoint lacks (new concatenated conditions) get zero
    weights, so the model computes what the checkpoint did. Returns a new dict."""
    state = dict(state)
    key = f"{prefix}{model.input_weight}"
    want = model.get_parameter(model.input_weight).shape[1]
    if key in state and state[key].shape[1] < want:
        old = state[key]
        state[key] = torch.cat([old, old.new_zeros(old.shape[0], want - old.shape[1], *old.shape[2:])], dim=1)
    return state


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (works on the meta device)."""
    return sum(p.numel() for p in model.parameters())
