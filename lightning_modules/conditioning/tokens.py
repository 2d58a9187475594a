"""Conditions given as extra tokens appended to the text sequence the backbone cross-attends to.

    ReferenceImage  tokens = W · VisionEncoder(image)      Movie Gen personalization (§5: the reference face's
                                                            vision tokens are concatenated to the prompt tokens)
    TaskTokens      tokens = E[task]                        Movie Gen Edit (§6: a learned embedding per task)

The output projection W (and E) starts at zero: the new tokens carry zero values, so they add nothing to the
cross-attention's output. They do take a share of the attention weights (a zero key scores 0), so a
checkpoint trained without them is not exactly unchanged: the text's share of attention is rescaled until
the tokens learn keys of their own. A null condition (dropped for guidance, or absent) has its tokens masked
out, which is exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_modules.conditioning.base import Conditioner, Encode


class ReferenceImage(Conditioner):
    """A reference image (the batch's "reference" [B, 3, H, W], else the first frame of "video") → tokens.

    Args:
        encoder: a vision network, image [B, 3, H, W] → features [B, N, F] with an attribute `dim` = F
            (e.g. `nn.vision.PatchEncoder`, or a pretrained encoder loaded from a local folder).
        dim: the backbone width; dropout: probability of training without the reference.
    """

    kind = "tokens"

    def __init__(self, encoder: nn.Module, dim: int, dropout: float = 0.1) -> None:
        super().__init__(dropout)
        self.encoder = encoder
        self.projection = nn.Linear(encoder.dim, dim)
        nn.init.zeros_(self.projection.weight)
        nn.init.zeros_(self.projection.bias)

    def inputs(self, batch: dict[str, Any], encode: Encode, latent_shape: Sequence[int], train: bool) -> dict:
        image = batch["reference"] if "reference" in batch else batch["video"][:, :, 0]
        return {"image": image.float(), "present": torch.ones(image.shape[0], dtype=torch.bool, device=image.device)}

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
    """`tokens` learned tokens per task name (the batch's "task": one name per sample).

    Args:
        tasks: the task names; dim: the backbone width; tokens: tokens per task; dropout: as usual.
    """

    kind = "tokens"

    def __init__(self, tasks: Sequence[str], dim: int, tokens: int = 1, dropout: float = 0.0) -> None:
        super().__init__(dropout)
        self.tasks = list(tasks)
        self.embedding = nn.Parameter(torch.zeros(len(self.tasks), tokens, dim))

    def inputs(self, batch: dict[str, Any], encode: Encode, latent_shape: Sequence[int], train: bool) -> torch.Tensor:
        names = batch["task"]
        unknown = sorted({n for n in names if n not in self.tasks})
        if unknown:
            raise ValueError(f"TaskTokens: unknown task(s) {unknown}; known: {self.tasks}")
        return torch.tensor([self.tasks.index(n) for n in names], dtype=torch.long)

    def null(self, raw: torch.Tensor) -> torch.Tensor:
        return torch.full_like(raw, -1)  # -1 = no task: masked out

    def forward(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        present = raw >= 0
        tokens = self.embedding[raw.clamp_min(0).to(self.embedding.device)]
        return tokens, present.to(tokens.device).view(-1, 1).expand(-1, tokens.shape[1]).clone()
