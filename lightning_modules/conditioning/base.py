"""The interface every conditioner shares, and the bundle of conditions the backbone receives.

A conditioner turns part of a batch into something the backbone consumes, in one of four ways (its `kind`):

    "context"  a token sequence the backbone cross-attends to (the text)         → Conditions.context / mask
    "tokens"   extra tokens appended to that sequence (reference image, task)    → Conditions.context / mask
               (with `own_softmax`, a segment of their own: Conditions.context_segments)
    "concat"   latents concatenated to x_t on the channels (image, mask, ...)   → Conditions.concat
    "frames"   features per latent frame added to the video tokens              → Conditions.frame_features
    "structure" a map the backbone's structure guidance reads (edges, AVID)     → Conditions.structure

It works in three parameter-free steps and one learned one:

    raw   = conditioner.inputs(batch, latents, train)    what the batch holds (prompts, pixels → latents)
    raw'  = conditioner.drop(raw, keep)                   rows with keep = False take the null value
    value = conditioner(raw')                             the learned embedding (its forward: an FSDP unit)

Each conditioner owns its training dropout (`dropout`, for classifier-free guidance) and its null value (the
empty prompt, zero latents, a zero feature). New input weights start at zero, so a backbone initialised from a
checkpoint trained without the conditioner starts unchanged (for "tokens" see `conditioning.tokens`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import nn

KINDS = ("context", "tokens", "concat", "frames", "structure")
Encode = Callable[[torch.Tensor], torch.Tensor]  # pixels [B, 3, T, H, W] in [-1, 1] → normalised latent


class Conditioner(nn.Module):
    """Base class; see the module docstring. Subclasses set `kind` and implement `inputs` and `null`, and
    `forward` when they have weights (default: the identity on the raw value).

    Args:
        dropout: probability, in training, that a sample's condition is replaced by its null value.
    """

    kind: ClassVar[str] = "concat"
    channels: int = 0  # "concat": latent channels added to x_t
    own_softmax: bool = False  # "tokens": attended with a softmax of their own, not the text's (`assemble`)

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{type(self).__name__}: dropout={dropout} must be in [0, 1)")
        self.dropout = float(dropout)

    def inputs(self, batch: dict[str, Any], encode: Encode, latent_shape: Sequence[int], train: bool) -> Any:
        """The raw condition of `batch` (B samples); `latent_shape` = the target latent's [C, T, H, W]."""
        raise NotImplementedError

    def null(self, raw: Any) -> Any:
        """The null condition, shaped like `raw`."""
        raise NotImplementedError

    def drop(self, raw: Any, keep: torch.Tensor) -> Any:
        """`raw` with the rows where keep [B] is False replaced by the null value."""
        if bool(keep.all()):
            return raw
        null = self.null(raw)
        if isinstance(raw, torch.Tensor):
            mask = keep.to(raw.device).view(-1, *([1] * (raw.ndim - 1)))
            return torch.where(mask, raw, null)
        return [r if k else n for r, n, k in zip(raw, null, keep.tolist())]

    def forward(self, raw: Any) -> Any:
        return raw

    def preview(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Videos [B, 3, T, H, W] in [-1, 1] worth showing beside samples (e.g. the low-resolution input)."""
        return {}


@dataclass
class Conditions:
    """What the backbone receives besides x_t and t. Any field may be None."""

    context: torch.Tensor | None = None          # [B, L, dim]
    context_mask: torch.Tensor | None = None     # bool [B, L], True = a real token
    concat: torch.Tensor | None = None           # [B, C_c, T, H, W] (latent grid)
    frame_features: torch.Tensor | None = None   # [B, T, dim] (latent frames)
    fps: torch.Tensor | None = None              # [B]
    guidance: torch.Tensor | None = None         # [B, n] guidance scales, for a guidance-distilled backbone
    structure: torch.Tensor | None = None        # [B, C_s, T, H, W] structure map (latent grid), for a guided backbone
    context_segments: tuple[int, ...] | None = None  # lengths of the context's softmax segments (None: one)
    time_embedding: torch.Tensor | None = None   # [B, dim] added to the time embedding (a task vector)
    frame_offset: torch.Tensor | None = None     # [B] long: first temporal position of each sample (images)

    def backbone_kwargs(self) -> dict[str, torch.Tensor | None]:
        """The backbone's keyword arguments; `guidance`, `structure_map`, `context_segments`, `time_embedding` and
        `frame_offset` only when set (a backbone without them does not take them)."""
        kwargs = {"context": self.context, "context_mask": self.context_mask, "cond": self.concat,
                  "frame_features": self.frame_features, "fps": self.fps}
        if self.guidance is not None:
            kwargs["guidance"] = self.guidance
        if self.structure is not None:
            kwargs["structure_map"] = self.structure
        if self.context_segments is not None:
            kwargs["context_segments"] = self.context_segments
        for name in ("time_embedding", "frame_offset"):
            if getattr(self, name) is not None:
                kwargs[name] = getattr(self, name)
        return kwargs

    def window(self, start: int, end: int) -> Conditions:
        """The conditions of latent frames [start, end) (temporal windows of MultiDiffusion); the per-sample
        fields (context, fps, guidance) are the same in every window."""
        return replace(self, concat=None if self.concat is None else self.concat[:, :, start:end],
                       frame_features=None if self.frame_features is None else self.frame_features[:, start:end],
                       structure=None if self.structure is None else self.structure[:, :, start:end])

    @staticmethod
    def cat(parts: Sequence[Conditions]) -> Conditions:
        """Stack along the batch (one part per guidance pass); context sequences are padded to the longest, each
        softmax segment on its own (so the segments line up)."""
        out = {}
        for name in ("concat", "frame_features", "fps", "guidance", "structure", "time_embedding", "frame_offset"):
            values = [getattr(p, name) for p in parts]
            out[name] = None if values[0] is None else torch.cat(values)
        if parts[0].context is None:
            return Conditions(**out)
        segments = [p.context_segments or (p.context.shape[1],) for p in parts]
        lengths = tuple(max(column) for column in zip(*segments))
        pad = lambda x, length, value: nn.functional.pad(x, (0, 0, 0, length - x.shape[1]) if x.ndim == 3
                                                         else (0, length - x.shape[1]), value=value)

        def padded(x: torch.Tensor, own: Sequence[int], value: float | bool) -> torch.Tensor:
            return torch.cat([pad(piece, length, value) for piece, length in zip(x.split(list(own), dim=1), lengths)],
                             dim=1)

        out["context"] = torch.cat([padded(p.context, own, 0.0) for p, own in zip(parts, segments)])
        out["context_mask"] = torch.cat([padded(p.context_mask, own, False) for p, own in zip(parts, segments)])
        out["context_segments"] = lengths if parts[0].context_segments else None
        return Conditions(**out)


def assemble(conditioners: dict[str, Conditioner], values: dict[str, Any], fps: torch.Tensor | None) -> Conditions:
    """Conditions from the embedded values of each conditioner, in the conditioners' order: context and tokens
    are concatenated along the sequence (first the text and the tokens that share its softmax, then each group
    of tokens with `own_softmax`, a segment of its own), concat latents and structure maps along the channels,
    frame features summed. A "tokens" value (tokens, mask, vector) also adds its vector [B, dim] to the time
    embedding (summed over conditioners)."""
    context, masks, concat, frames, structure, own, vector = [], [], [], None, [], [], None
    for name, conditioner in conditioners.items():
        value = values[name]
        if conditioner.kind == "tokens" and len(value) == 3:
            vector = value[2] if vector is None else vector + value[2]
            value = value[:2]
        if conditioner.kind in ("context", "tokens") and conditioner.own_softmax:
            own.append(value)
        elif conditioner.kind in ("context", "tokens"):
            tokens, mask = value
            context.append(tokens)
            masks.append(mask)
        elif conditioner.kind == "concat":
            concat.append(value)
        elif conditioner.kind == "frames":
            frames = value if frames is None else frames + value
        elif conditioner.kind == "structure":
            structure.append(value)
        else:
            raise ValueError(f"conditioner {name}: unknown kind {conditioner.kind!r}; one of {KINDS}")
    segments = (sum(t.shape[1] for t in context), *(tokens.shape[1] for tokens, _ in own)) if own and context else None
    context, masks = context + [t for t, _ in own], masks + [m for _, m in own]
    return Conditions(context=torch.cat(context, dim=1) if context else None,
                      context_mask=torch.cat(masks, dim=1) if masks else None,
                      concat=torch.cat(concat, dim=1) if concat else None, frame_features=frames, fps=fps,
                      structure=torch.cat(structure, dim=1) if structure else None, context_segments=segments,
                      time_embedding=vector)
