"""Reference images for personalization (Movie Gen §4, PT2V): masked crops of an identity's object, and the paired
or cross-paired choice of one for a clip.

A reference is the object alone: its pixels (mask m) in a square window centred on the mask's centroid, the rest
black, resampled to S x S:

    c       = Σ_p m(p)·p / Σ_p m(p)                        (continuous pixel coordinates, centres at i + 0.5)
    window  = [c − s/2, c + s/2]²,  s = extent · min(H, W)  (a fixed share of the canvas: the object's size stays
                                                             visible, its position and the background do not)
    crop(u) = (x·m)(c + u·s/2),  u ∈ [−1, 1]²               bilinear, zeros outside the canvas

The synthetic world stores them with each identity clip (`ref.npz`, `datamodules.synthetic.generate`):

    paired        crops of the clip's own frames (`paired_frames`: the frames where at least `MIN_VISIBLE` of the
                  object's largest area shows, so a distractor or a wall does not hide it)
    cross         one crop of every other clip of the same identity in the split (`cross_clips`, `cross_frames`)

`pick_reference` draws one: the paper's paired data (the reference comes from the clip itself: its pose and
size can be copied) or cross-paired data (from another clip of the identity: only the identity carries over).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

REFERENCE_SIZE = 32   # pixels per side of the stored crops
EXTENT = 0.65         # window side, x the canvas's shorter side (the world's identity objects: diameter <= 0.5)
MIN_VISIBLE = 0.6     # a frame is a reference when its object shows at least this share of its largest area
MODES = ("paired", "cross")


def masked_crops(frames: torch.Tensor, masks: torch.Tensor, size: int = REFERENCE_SIZE,
                 extent: float = EXTENT) -> torch.Tensor:
    """Frames [N, 3, H, W] (float) and masks [N, H, W] (bool or weights in [0, 1]) → crops [N, 3, size, size]
    (see the module docstring); an empty mask gives a black crop."""
    n, _, h, w = frames.shape
    m = masks.to(frames.dtype)
    area = m.sum(dim=(1, 2))
    ys = torch.arange(h, dtype=frames.dtype, device=frames.device) + 0.5
    xs = torch.arange(w, dtype=frames.dtype, device=frames.device) + 0.5
    cy = (m.sum(2) * ys).sum(1) / area.clamp_min(1e-6)
    cx = (m.sum(1) * xs).sum(1) / area.clamp_min(1e-6)
    side = extent * min(h, w)
    theta = torch.zeros(n, 2, 3, dtype=frames.dtype, device=frames.device)
    theta[:, 0, 0], theta[:, 0, 2] = side / w, 2 * cx / w - 1  # normalised x = 2X/W − 1, X = c_x + u·s/2
    theta[:, 1, 1], theta[:, 1, 2] = side / h, 2 * cy / h - 1
    grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)
    crops = F.grid_sample(frames * m[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return crops * (area > 0).to(crops.dtype).view(n, 1, 1, 1)


def clip_references(frames: np.ndarray, masks: np.ndarray, size: int = REFERENCE_SIZE,
                    extent: float = EXTENT) -> tuple[np.ndarray, np.ndarray]:
    """(crops uint8 [K, size, size, 3], their frame indices [K]) of a clip's frames uint8 [T, H, W, 3] where the
    object (masks bool [T, H, W]) shows at least `MIN_VISIBLE` of its largest area."""
    area = masks.reshape(len(masks), -1).sum(1)
    chosen = np.flatnonzero(area >= MIN_VISIBLE * max(int(area.max()), 1))
    pixels = torch.from_numpy(np.ascontiguousarray(frames[chosen])).permute(0, 3, 1, 2).float()
    crops = masked_crops(pixels, torch.from_numpy(masks[chosen]), size, extent)
    return crops.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy(), chosen


def read_references(data: bytes) -> dict[str, np.ndarray]:
    """The arrays of a `ref.npz` (np.load with allow_pickle=False)."""
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def pick_reference(refs: dict[str, np.ndarray], mode: str, index: int,
                   rng: np.random.Generator | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """One crop uint8 [S, S, 3] of a clip's references and where it comes from ({"clip", "frame"}; clip = the
    world index of the clip in its split). mode "paired": a frame of the clip itself (`index`); "cross": a frame
    of another clip of its identity. With `rng` the choice is random (the datamodule seeds it by the clip's index
    in validation: the same reference every time), else the first."""
    if mode not in MODES:
        raise ValueError(f"reference={mode!r}: choose one of {MODES}")
    crops = refs[mode]
    if len(crops) == 0:
        raise ValueError(f"clip {index} has no {mode} reference (cross-pairs need 2+ clips per identity)")
    k = int(rng.integers(len(crops))) if rng is not None else 0
    if mode == "paired":
        return crops[k], {"clip": int(index), "frame": int(refs["paired_frames"][k])}
    return crops[k], {"clip": int(refs["cross_clips"][k]), "frame": int(refs["cross_frames"][k])}
