"""The Fréchet distance between two sets of feature vectors, and its real-vs-real floor.

    FD(r, g) = ‖μ_r − μ_g‖² + Tr(Σ_r + Σ_g − 2(Σ_r Σ_g)^½)

with μ, Σ the mean and (unbiased) covariance of each set (torchmetrics' FrechetInceptionDistance, fed features
through an identity extractor). FD is biased upward by the finite sample count: two sets of n clips drawn from
one distribution score above 0, the more so the smaller n and the more features. So a generated set's FD is
only read against the floor: the FD of the real held-out clips against as many real training clips
(`FrechetWithFloor`), computed with the same n, features and probe.
"""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance


class Features(nn.Module):
    """The identity, as torchmetrics' FID feature extractor for precomputed features [N, F]."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FD between feature sets real [N, F] and fake [M, F] (N, M ≥ 2), see the module doc."""
    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"frechet_distance needs 2 or more vectors per set, got {len(real)} and {len(fake)}")
    # the sets given are the whole sets: no syncing them with other processes' (torchmetrics' default under DDP)
    metric = FrechetInceptionDistance(feature=Features(real.shape[1]), reset_real_features=True,
                                      sync_on_compute=False)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return float(metric.compute())


class FrechetWithFloor:
    """Accumulates features of generated clips (`add_samples`), of the real held-out clips they were prompted
    from (`add_real`) and of real training clips (`add_reference`); `compute()` →

        fd             FD(held-out real, samples)
        fd_real_floor  FD(held-out real, the first n reference clips), n = the number of samples
        fd_samples     n

    (an entry is left out when a set has fewer than 2 vectors; the floor uses all reference clips if there
    are fewer than n, which raises it).
    """

    def __init__(self, num_features: int) -> None:
        self.num_features = num_features
        self.samples: list[torch.Tensor] = []
        self.real: list[torch.Tensor] = []
        self.reference: list[torch.Tensor] = []

    def add_samples(self, features: torch.Tensor) -> None:
        self.samples.append(features.detach().double().cpu())

    def add_real(self, features: torch.Tensor) -> None:
        self.real.append(features.detach().double().cpu())

    def add_reference(self, features: torch.Tensor) -> None:
        self.reference.append(features.detach().double().cpu())

    def compute(self) -> dict[str, float]:
        cat = lambda parts: torch.cat(parts) if parts else torch.zeros(0, self.num_features, dtype=torch.float64)
        samples, real, reference = cat(self.samples), cat(self.real), cat(self.reference)
        out: dict[str, float] = {}
        if len(samples) >= 2 and len(real) >= 2:
            out["fd"] = frechet_distance(real, samples)
            out["fd_samples"] = float(len(samples))
        n = max(len(samples), 2)
        if len(real) >= 2 and len(reference) >= 2:
            out["fd_real_floor"] = frechet_distance(real, reference[:n])
        return out
