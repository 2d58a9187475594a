"""A contact detector: which frames of a clip a sound starts on (a bounce, a collision), from the pixels.

The V2A line's video features (`conditioning.contact.ContactFeatures`): pooled pixels carry a bounce too faintly
for a tiny DiT to find (events from pooled-frame features: AUC ~0.7 on held-out clips), so a small network
trained once on the world's clips, with the onsets heard in their own soundtracks as labels, finds them first
(AUC ~0.93), the stand-in for the paper's frozen MetaCLIP features:

    h      = GELU(conv3d(...)) x 4       3x3x3 convolutions over (time, height, width), two with spatial stride 2
    f_k    = [mean_xy h_k, max_xy h_k]   per frame k: [B, T, 2w]
    ℓ_k    = w_o · f_k + b               the logit that a sound starts on frame k
    out_k  = [f_k, σ(ℓ_k)]               `frame_features`: [B, T, 2w + 1]

Trained with a class-weighted binary cross-entropy on ℓ (`fit_contact_encoder`, in `conditioning.contact`).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn


class ContactEncoder(nn.Module):
    """See the module docstring. width: w, the channels of the last convolutions."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        half = max(1, width // 2)
        self.convs = nn.ModuleList([
            nn.Conv3d(3, half, 3, padding=1),
            nn.Conv3d(half, width, 3, padding=1, stride=(1, 2, 2)),
            nn.Conv3d(width, width, 3, padding=1, stride=(1, 2, 2)),
            nn.Conv3d(width, width, 3, padding=1),
        ])
        self.head = nn.Linear(2 * width, 1)
        self.width = width

    @property
    def features(self) -> int:
        """Width of `frame_features`: 2w + 1."""
        return 2 * self.width + 1

    def forward(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Video [B, 3, T, H, W] in [-1, 1] → (f [B, T, 2w], logit ℓ [B, T])."""
        h = video.float()
        for conv in self.convs:
            h = nn.functional.gelu(conv(h))
        pooled = rearrange(torch.cat([h.mean((-2, -1)), h.amax((-2, -1))], dim=1), "b c t -> b t c")
        return pooled, self.head(pooled).squeeze(-1)

    def frame_features(self, video: torch.Tensor) -> torch.Tensor:
        """[f_k, σ(ℓ_k)] per frame: [B, T, 2w + 1]."""
        features, logit = self(video)
        return torch.cat([features, logit.sigmoid()[..., None]], dim=-1)
