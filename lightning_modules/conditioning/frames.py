"""Frame-aligned features added to the video tokens (Movie Gen Audio conditions on video features this way), and
the motion bucket of Animated Stickers, an embedding added to every frame.

    f = Interp_T(features)         the batch's features [B, T_f, F] resampled (linearly) to T latent frames
    c = W·f                        [B, T, dim], W zero-initialised: a checkpoint without it starts unchanged
    tokens[b, (t, h, w)] += c[b, t]   (in the backbone, averaged over the patch's frames)

Null value: zero features.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from datamodules.synthetic.world import MOTION_BUCKET_EDGES, motion_bucket
from lightning_modules.conditioning.base import Conditioner, Encode


class FrameFeatures(Conditioner):
    """See the module docstring.

    Args:
        features: F, the width of the batch's features; dim: the backbone width; key: the batch key.
    """

    kind = "frames"

    def __init__(self, features: int, dim: int, key: str = "features", dropout: float = 0.0) -> None:
        super().__init__(dropout)
        self.key = key
        self.projection = nn.Linear(features, dim)
        nn.init.zeros_(self.projection.weight)
        nn.init.zeros_(self.projection.bias)

    def inputs(self, batch: dict[str, Any], encode: Encode, latent_shape: Sequence[int], train: bool) -> torch.Tensor:
        features = torch.as_tensor(batch[self.key]).float()  # [B, T_f, F]
        if features.ndim != 3 or features.shape[-1] != self.projection.in_features:
            raise ValueError(f"FrameFeatures: batch[{self.key!r}] must be [B, T, {self.projection.in_features}], "
                             f"got {tuple(features.shape)}")
        frames = int(latent_shape[1])
        return nn.functional.interpolate(features.transpose(1, 2), size=frames, mode="linear",
                                         align_corners=True).transpose(1, 2) if features.shape[1] != frames else features

    def null(self, raw: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(raw)

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        return self.projection(raw.to(self.projection.weight.dtype))


class MotionBucket(Conditioner):
    """How much the clip moves, as a learned embedding added to every latent frame (like SVD's motion_bucket_id):

        c[b, t] = E[bucket_b + 1]      E [buckets + 1, dim] zero-initialised; row 0 is the null ("unknown")

    The bucket (0 .. len(MOTION_BUCKET_EDGES)) is read from the batch's "motion_bucket" [B] (a request asking for
    an amount of motion), else from each clip's json (`motion_bucket`, computed when shards are written; or its
    `motion_score`), else `default` (what sampling from a prompt asks for). With a large bucket at sampling
    time a user asks for large motion.
    """

    kind = "frames"

    def __init__(self, dim: int, default: int | None = None, dropout: float = 0.0) -> None:
        super().__init__(dropout)
        self.buckets = len(MOTION_BUCKET_EDGES) + 1
        if default is not None and not 0 <= default < self.buckets:
            raise ValueError(f"MotionBucket: default={default} must be a bucket in 0..{self.buckets - 1}")
        self.default = default
        self.embedding = nn.Embedding(self.buckets + 1, dim)
        nn.init.zeros_(self.embedding.weight)

    def bucket(self, batch: dict[str, Any]) -> torch.Tensor:
        """The batch's motion buckets [B] (see the class docstring)."""
        if "motion_bucket" in batch:
            return torch.as_tensor(batch["motion_bucket"], dtype=torch.long).flatten()
        size = len(batch["text"])
        metas = batch.get("meta") or [{}] * size
        buckets = []
        for meta in metas:
            if meta.get("motion_bucket") is not None:
                buckets.append(int(meta["motion_bucket"]))
            elif meta.get("motion_score") is not None:
                buckets.append(motion_bucket(float(meta["motion_score"])))
            elif self.default is not None:
                buckets.append(self.default)
            else:
                raise ValueError("MotionBucket: a sample has no motion_bucket or motion_score in its json; set "
                                 "model.conditioners.<name>.default to the bucket to ask for")
        return torch.tensor(buckets, dtype=torch.long)

    def inputs(self, batch: dict[str, Any], encode: Encode, latent_shape: Sequence[int], train: bool) -> torch.Tensor:
        bucket = self.bucket(batch)
        if bool((bucket < 0).any() or (bucket >= self.buckets).any()):
            raise ValueError(f"MotionBucket: buckets {bucket.tolist()} outside 0..{self.buckets - 1}")
        return (bucket + 1).view(-1, 1).expand(-1, int(latent_shape[1])).contiguous()

    def null(self, raw: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(raw)

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        return self.embedding(raw.to(self.embedding.weight.device))
