"""Conditions given as extra tokens appended to the text sequence the backbone cross-attends to.

    ReferenceImage  tokens = W · VisionEncoder(image)      Movie Gen personalization (§4: the reference face's
                                                            vision tokens are concatenated to the prompt tokens)
    TaskTokens      tokens = W · E[task]                    Movie Gen Edit (§5: a learned embedding per task; a
                    + vector W' · E[task]                   second projection is added to the time embedding)

The output projections W (and W') start at zero: the new tokens carry zero values, so they add nothing to the
cross-attention's output. In the text's softmax they would still take a share of the attention weights (a zero
key scores 0), rescaling the text's share until they learn keys of their own; so the reference's tokens, though
concatenated to the text sequence (the paper's mechanism: the same cross-attention, the same K/V projections),
are attended with a softmax of their own (`own_softmax`, decoupled cross-attention as in IP-Adapter), the two
outputs summed:

    CrossAttn(x, [P; R]) = softmax(q K_Pᵀ/√d) V_P + softmax(q K_Rᵀ/√d) V_R        (`nn.attention.Attention`)

With W = 0, R = 0 and V_R = W_v·R = 0: a checkpoint trained without the reference predicts exactly what it did
(`model.init_from` of a text-to-video model). The text's softmax is also the only one the DiT's pooled text
reads. A null condition (dropped for guidance, or absent) has its tokens masked out, which is exact either way;
a segment with no real token adds 0. TaskTokens take a segment of their own too by default (own_softmax).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.conditioning.base import Conditioner, Encode


class ReferenceImage(Conditioner):
    """A reference image (the batch's "reference" [B, 3, H, W], else the first frame of "video") → tokens.

    Args:
        encoder: a vision network, image [B, 3, H, W] → features [B, N, F] with an attribute `dim` = F
            (e.g. `nn.vision.PatchEncoder`, or a pretrained encoder loaded from a local folder).
        dim: the backbone width; dropout: probability of training without the reference.
        size: reference images are resized to size x size (bilinear; None: as given), e.g. a user's image at
            `task=sample` to the size of the training crops.
        own_softmax: attend to the tokens with a softmax of their own (see the module docstring; False: in
            the text's softmax, not exact at initialisation).
        train_encoder: False freezes the encoder (Movie Gen PT2V stages I and II; the projection still trains).
    """

    kind = "tokens"

    def __init__(self, encoder: nn.Module, dim: int, dropout: float = 0.1, size: int | None = None,
                 own_softmax: bool = True, train_encoder: bool = True) -> None:
        super().__init__(dropout)
        self.encoder, self.size = encoder, size
        self.projection = nn.Linear(encoder.dim, dim)
        nn.init.zeros_(self.projection.weight)
        nn.init.zeros_(self.projection.bias)
        self.own_softmax = own_softmax
        self.encoder.requires_grad_(train_encoder)

    def inputs(self, batch: dict[str, Any], encode: Encode, latent_shape: Sequence[int], train: bool) -> dict:
        image = (batch["reference"] if "reference" in batch else batch["video"][:, :, 0]).float()
        if self.size and tuple(image.shape[-2:]) != (self.size, self.size):
            image = F.interpolate(image, size=(self.size, self.size), mode="bilinear", antialias=True,
                                  align_corners=False)
        return {"image": image, "present": torch.ones(image.shape[0], dtype=torch.bool, device=image.device)}

    def null(self, raw: dict) -> dict:
        return {"image": torch.zeros_like(raw["image"]), "present": torch.zeros_like(raw["present"])}

    def drop(self, raw: dict, keep: torch.Tensor) -> dict:
        keep = keep.to(raw["image"].device)
        return {"image": raw["image"] * keep.view(-1, 1, 1, 1), "present": raw["present"] & keep}

    def forward(self, raw: dict) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.projection(self.encoder(raw["image"]))
        mask = raw["present"].view(-1, 1).expand(-1, tokens.shape[1])
        return tokens, mask.clone()

    def preview(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        image = batch["reference"] if "reference" in batch else batch["video"][:, :, 0]
        return {"reference": image.float().unsqueeze(2).expand(-1, -1, int(batch.get("frames") or 1), -1, -1)}


class TaskTokens(Conditioner):
    """Movie Gen Edit's task embedding (Emu Edit's): a learned embedding e_k of the batch's task k, projected to
    `tokens` tokens appended to the text and to a vector added to the time embedding:

        e = E[k] ∈ R^E,   tokens = reshape(W_tok·e, [tokens, dim]),   vector = W_vec·e ∈ R^dim

    W_tok and W_vec start at zero: the tokens carry zero values (with `own_softmax`, attended in a segment of
    their own: they add 0 to the cross-attention, see the module docstring) and the vector adds 0, so a
    text-to-video checkpoint starts unchanged. The null task (guidance, or no task) masks the tokens and has a
    zero vector.

    The batch's "task" (one name per sample) names the task; a batch without one is `source_task` when it holds
    a "source" (an input video to edit, `task=sample` / `task=edit`) and `default` otherwise.

    Args:
        tasks: the task names; dim: the backbone width; tokens: tokens per task (4 in the paper);
        embed_dim: E; dropout: as usual; own_softmax: see the module docstring (False: the text's softmax, not
        exact at initialisation); default, source_task: the task of a batch without "task".
    """

    kind = "tokens"

    def __init__(self, tasks: Sequence[str], dim: int, tokens: int = 4, embed_dim: int = 32, dropout: float = 0.0,
                 own_softmax: bool = True, default: str | None = None, source_task: str | None = None) -> None:
        super().__init__(dropout)
        self.tasks, self.dim, self.tokens = list(tasks), int(dim), int(tokens)
        for name in (default, source_task):
            if name is not None and name not in self.tasks:
                raise ValueError(f"TaskTokens: default task {name!r} is not one of {self.tasks}")
        self.default, self.source_task, self.own_softmax = default, source_task, own_softmax
        self.embedding = nn.Embedding(len(self.tasks), embed_dim)
        self.to_tokens = nn.Linear(embed_dim, self.tokens * self.dim)
        self.to_vector = nn.Linear(embed_dim, self.dim)
        for layer in (self.to_tokens, self.to_vector):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def names(self, batch: dict[str, Any]) -> list[str]:
        """The task of every sample of `batch`."""
        if "task" in batch:
            return list(batch["task"])
        fallback = self.source_task if "source" in batch and self.source_task else self.default
        if fallback is None:
            raise ValueError(f"TaskTokens: the batch has no 'task' and no default is set (tasks {self.tasks})")
        size = len(batch["text"]) if "text" in batch else batch["video"].shape[0]
        return [fallback] * size

    def inputs(self, batch: dict[str, Any], encode: Encode, latent_shape: Sequence[int], train: bool) -> torch.Tensor:
        names = self.names(batch)
        unknown = sorted({n for n in names if n not in self.tasks})
        if unknown:
            raise ValueError(f"TaskTokens: unknown task(s) {unknown}; known: {self.tasks}")
        return torch.tensor([self.tasks.index(n) for n in names], dtype=torch.long)

    def null(self, raw: torch.Tensor) -> torch.Tensor:
        return torch.full_like(raw, -1)  # -1 = no task: masked out

    def forward(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens [B, tokens, dim], mask bool [B, tokens], vector [B, dim]) of task ids [B] (−1: none)."""
        raw = raw.to(self.embedding.weight.device)
        present = raw >= 0
        e = self.embedding(raw.clamp_min(0))
        tokens = self.to_tokens(e).view(-1, self.tokens, self.dim)
        vector = self.to_vector(e) * present[:, None].to(e.dtype)
        return tokens, present.view(-1, 1).expand(-1, self.tokens).clone(), vector
