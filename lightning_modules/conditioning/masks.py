"""Synthetic inpainting masks for training (AVID, arXiv 2312.03816; Stable Diffusion inpainting's mask families).

A mask is [B, 1, T, H, W] in {0, 1}, 1 = the region to generate. Each clip draws one kind, with the weights given:

    box     an axis-aligned rectangle, sides in [min_frac, max_frac] of the frame
    blob    a union of 3-6 discs around a centre (irregular outline)
    stroke  a brush stroke: a polyline of 2-4 segments, 1/8-1/5 of the frame thick
    border  uncropping: bands of [min_frac / 2, max_frac / 2] of the frame along 1-3 sides
    object  the exact mask of one object of the clip, from the world's label maps (it follows the object);
            a box when the batch has no label maps or the clip no object

Box and blob masks move with probability `moving`: their centre drifts in a straight line across the clip (up to
half the frame), so the model sees static, moving and tracking masks.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

MASK_KINDS = ("box", "blob", "stroke", "border", "object")


def _grid(height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates in [0, 1]: (y [H, 1], x [1, W])."""
    y = (torch.arange(height, dtype=torch.float32) + 0.5) / height
    x = (torch.arange(width, dtype=torch.float32) + 0.5) / width
    return y[:, None], x[None, :]


class MaskGenerator:
    """Draws masks of the kinds above (see the module docstring).

    Args:
        weights: kind -> relative frequency (kinds left out are never drawn).
        moving: probability that a box or blob moves across the clip.
        min_frac, max_frac: size range of boxes and blobs (fractions of the frame side).
    """

    def __init__(self, weights: Mapping[str, float] | None = None, moving: float = 0.5, min_frac: float = 0.25,
                 max_frac: float = 0.6) -> None:
        weights = dict(weights if weights is not None else {kind: 1.0 for kind in MASK_KINDS})
        unknown = sorted(set(weights) - set(MASK_KINDS))
        if unknown:
            raise ValueError(f"mask kinds {unknown} are unknown; choose from {MASK_KINDS}")
        if not weights or min(weights.values()) < 0 or sum(weights.values()) <= 0:
            raise ValueError(f"mask weights {weights} must be >= 0 with a positive sum")
        if not 0.0 < min_frac <= max_frac <= 1.0:
            raise ValueError(f"mask sizes need 0 < min_frac <= max_frac <= 1, got {min_frac}, {max_frac}")
        self.kinds = list(weights)
        self.probabilities = torch.tensor([weights[k] for k in self.kinds], dtype=torch.float64)
        self.moving, self.min_frac, self.max_frac = moving, min_frac, max_frac

    def __call__(self, batch_size: int, frames: int, height: int, width: int, labels: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Masks [B, 1, T, H, W]; `labels` int [B, T, H, W] (0 = background) for the "object" kind."""
        picks = torch.multinomial(self.probabilities, batch_size, replacement=True, generator=generator)
        masks = [self.draw(self.kinds[int(k)], frames, height, width,
                           None if labels is None else labels[i], generator) for i, k in enumerate(picks)]
        return torch.stack(masks)[:, None]

    def draw(self, kind: str, frames: int, height: int, width: int, labels: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """One clip's mask [T, H, W] of `kind`."""
        rand = lambda *shape: torch.rand(shape, generator=generator)  # noqa: E731
        y, x = _grid(height, width)
        if kind == "object":
            if labels is not None:
                ids = labels[0].unique()
                ids = ids[ids > 0]
                if len(ids):
                    chosen = ids[int(torch.randint(len(ids), (1,), generator=generator))]
                    return (labels == chosen).float()
            kind = "box"
        if kind == "border":
            sides = torch.randperm(4, generator=generator)[: 1 + int(torch.randint(3, (1,), generator=generator))]
            band = self.min_frac / 2 + rand(1).item() * (self.max_frac - self.min_frac) / 2
            edges = [y < band, y > 1 - band, x < band, x > 1 - band]
            frame = torch.zeros(height, width, dtype=torch.bool)
            for side in sides.tolist():
                frame = frame | edges[side]
            return frame.float().expand(frames, -1, -1).clone()
        if kind == "stroke":
            points = rand(2 + int(torch.randint(3, (1,), generator=generator)), 2)  # (y, x) in [0, 1]
            thickness = 1 / 16 + rand(1).item() * (1 / 10 - 1 / 16)  # half-width: 1/8 - 1/5 of the frame thick
            frame = torch.zeros(height, width, dtype=torch.bool)
            for a, b in zip(points[:-1], points[1:]):
                frame = frame | (_distance_to_segment(y, x, a, b) <= thickness)
            return frame.float().expand(frames, -1, -1).clone()
        if kind not in ("box", "blob"):
            raise ValueError(f"unknown mask kind {kind!r}; choose from {MASK_KINDS}")
        size = self.min_frac + rand(2) * (self.max_frac - self.min_frac)  # (h, w) fractions
        start = size / 2 + rand(2) * (1 - size)  # the centre, inside the frame
        end = start
        if rand(1).item() < self.moving:
            end = (start + (rand(2) - 0.5)).clamp(size / 2, 1 - size / 2)
        if kind == "blob":  # disc offsets and radii relative to the blob's size, drawn once: the shape is rigid
            count = 3 + int(torch.randint(4, (1,), generator=generator))
            offsets, radii = (rand(count, 2) - 0.5) * size * 0.6, (0.25 + 0.25 * rand(count)) * size.min()
        out = torch.zeros(frames, height, width)
        for f in range(frames):
            cy, cx = start + (end - start) * (f / max(1, frames - 1))
            if kind == "box":
                inside = ((y - cy).abs() <= size[0] / 2) & ((x - cx).abs() <= size[1] / 2)
            else:
                inside = torch.zeros(height, width, dtype=torch.bool)
                for (dy, dx), r in zip(offsets, radii):
                    inside = inside | ((y - cy - dy) ** 2 + (x - cx - dx) ** 2 <= r * r)
            out[f] = inside.float()
        return out


def _distance_to_segment(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance of every pixel centre (y [H, 1], x [1, W]) to the segment a-b ((y, x) points)."""
    d = b - a
    length2 = float(d @ d)
    if length2 < 1e-12:
        return torch.sqrt((y - a[0]) ** 2 + (x - a[1]) ** 2)
    s = (((y - a[0]) * d[0] + (x - a[1]) * d[1]) / length2).clamp(0.0, 1.0)
    return torch.sqrt((y - a[0] - s * d[0]) ** 2 + (x - a[1] - s * d[1]) ** 2)


def coverage(mask: torch.Tensor) -> torch.Tensor:
    """Fraction of each clip's pixels to fill: mask [B, 1, T, H, W] -> [B]."""
    return mask.flatten(1).mean(dim=1)

