"""Pixels against the shapes world's known palette: colour distances, the background model of a prompt, and
the segmentation of each prompted object as the pixels nearest its colour (no network).

Pixels x ∈ [0, 1]³ (videos in [-1, 1] are mapped by x = (v + 1) / 2); colours are the world's uint8 RGB / 255.

    d(x, c)          = ‖x − c‖₂                                            a palette colour c
    d(x, [a, b])     = ‖x − (a + λ(b − a))‖₂,  λ = clamp(⟨x − a, b − a⟩ / ‖b − a‖², 0, 1)
                                                                            a two-colour gradient a → b
    d_bg(x)          = d(x, c₁) (plain), d(x, [c₁, c₂]) (gradient), τ_photo (photo: no colour model)
    d_blend(x)       = min_i d(x, △(c_i, c₁, c₂))   the nearest blend of an object's colour with the background's
    label(x)         = argmin over {objects i: d(x, c_i)} ∪ {background: d_bg(x)} ∪ {texture: min_w d(x, w)}
    mask_i           = close₃ₓ₃(label = i ∪ (label = texture ∩ dilate₅ₓ₅(label = i)))
    soft mask_i      = mask_i, except on its boundary: α_i(x) = d_bg(x) / (d_bg(x) + d_i(x))

For a textured object d_i is the distance to the segment from its colour halfway to white or black (blends in
which the object's colour dominates); the texture class (white, black) keeps pure texture pixels out of the
background and other objects, and the dilation and closing put them back inside their object. For a pixel
blended from object and background, x = αc + (1 − α)b, the soft mask is α: antialiased edges count by their
share, which makes centroids precise to a fraction of a pixel.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F

from datamodules.synthetic.world import BACKGROUND_COLOURS, OBJECT_COLOURS, TEXTURE_COLOURS

# The distance of a pixel to a photo background (which has no colour model): a pixel is an object's only if it
# is nearer than this to the object's colour. Half the smallest distance between two object colours (0.28).
PHOTO_DISTANCE = 0.14


def rgb(name: str, table: dict[str, tuple[int, int, int]] = OBJECT_COLOURS) -> torch.Tensor:
    """Colour `name` of a world palette (OBJECT_COLOURS, BACKGROUND_COLOURS, TEXTURE_COLOURS: "white" differs
    between the last two) as float [3] in [0, 1]."""
    if name not in table:
        raise ValueError(f"unknown colour {name!r}; choose from {sorted(table)}")
    return torch.tensor(table[name], dtype=torch.float32) / 255.0


def palette(names: Sequence[str], table: dict[str, tuple[int, int, int]] = OBJECT_COLOURS) -> torch.Tensor:
    """Colours [K, 3] in [0, 1] of `names` in `table`."""
    return torch.stack([rgb(n, table) for n in names])


def unit(video: torch.Tensor) -> torch.Tensor:
    """[-1, 1] → [0, 1] (clamped), float32."""
    return ((video.float() + 1) / 2).clamp(0, 1)


def colour_distance(pixels: torch.Tensor, colours: torch.Tensor) -> torch.Tensor:
    """d(x, c) = ‖x − c‖₂ for pixels [3, ...] and colours [K, 3] → [K, ...]."""
    shape = pixels.shape[1:]
    flat = pixels.reshape(3, -1)
    return (flat[None] - colours.to(flat)[:, :, None]).pow(2).sum(1).sqrt().reshape(len(colours), *shape)


def segment_distance(pixels: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """d(x, [a, b]) = ‖x − (a + λ(b − a))‖₂, λ = clamp(⟨x − a, b − a⟩ / ‖b − a‖², 0, 1); pixels [3, ...] → [...]."""
    shape = (3,) + (1,) * (pixels.dim() - 1)
    a, b = a.to(pixels).view(shape), b.to(pixels).view(shape)
    direction = b - a
    lam = (((pixels - a) * direction).sum(0) / direction.pow(2).sum().clamp_min(1e-12)).clamp(0, 1)
    return (pixels - (a + lam[None] * direction)).pow(2).sum(0).sqrt()


def triangle_distance(pixels: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """d(x, △abc), the distance to the nearest point of the filled triangle with corners a, b, c ([3] each; a
    segment when two coincide); pixels [3, ...] → [...]. x − a is projected on the triangle's plane,
    x − a ≈ s·(b − a) + t·(c − a) (least squares); inside (s, t ≥ 0, s + t ≤ 1) the distance is the projection's
    residual, outside the nearest point lies on an edge."""
    edges = torch.stack([segment_distance(pixels, a, b), segment_distance(pixels, b, c), segment_distance(pixels, a, c)])
    nearest_edge = edges.amin(0)
    u, v = (b - a).to(pixels), (c - a).to(pixels)
    gram = torch.stack([torch.stack([u @ u, u @ v]), torch.stack([u @ v, v @ v])])
    if torch.linalg.det(gram).abs() < 1e-10:  # degenerate: the edges cover it
        return nearest_edge
    shape = (3,) + (1,) * (pixels.dim() - 1)
    offset = pixels - a.to(pixels).view(shape)
    rhs = torch.stack([(offset * u.view(shape)).sum(0), (offset * v.view(shape)).sum(0)])
    s, t = torch.einsum("ij,j...->i...", torch.linalg.inv(gram), rhs)
    residual = (offset - s[None] * u.view(shape) - t[None] * v.view(shape)).pow(2).sum(0).sqrt()
    inside = (s >= 0) & (t >= 0) & (s + t <= 1)
    return torch.where(inside, residual, nearest_edge)


def blend_distance(pixels: torch.Tensor, meta: dict[str, Any]) -> torch.Tensor | None:
    """The distance of pixels [3, ...] to every colour a clip of scene record `meta` can hold: a blend
    αc + (1 − α)g of an object's colour c with a colour g of the background (the plain colour, or any point of a
    gradient: a triangle), α ∈ [0, 1]; the minimum over its objects. None for a textured object or a background
    with no colour model (a photo)."""
    background = (meta or {}).get("background") or {}
    colours, objects = list(background.get("colours") or []), (meta or {}).get("objects") or []
    if background.get("kind") not in ("plain", "gradient") or not colours or not objects:
        return None
    if any(o.get("texture", "solid") != "solid" for o in objects):
        return None
    first = rgb(colours[0], BACKGROUND_COLOURS)
    last = rgb(colours[1], BACKGROUND_COLOURS) if background["kind"] == "gradient" and len(colours) > 1 else first
    return torch.stack([triangle_distance(pixels, rgb(o["colour"]), first, last) for o in objects]).amin(0)


def background_distance(pixels: torch.Tensor, background: dict[str, Any]) -> torch.Tensor:
    """d_bg(x) of pixels [3, ...] for a world background record ({"kind", "colours"}), see the module doc."""
    kind, colours = background.get("kind"), list(background.get("colours") or [])
    if kind == "plain" and colours:
        return colour_distance(pixels, palette(colours[:1], BACKGROUND_COLOURS))[0]
    if kind == "gradient" and len(colours) >= 2:
        return segment_distance(pixels, rgb(colours[0], BACKGROUND_COLOURS), rgb(colours[1], BACKGROUND_COLOURS))
    return torch.full(pixels.shape[1:], PHOTO_DISTANCE, dtype=pixels.dtype, device=pixels.device)


def close(mask: torch.Tensor, size: int = 3) -> torch.Tensor:
    """Morphological closing (dilation then erosion, square window) of bool masks [..., H, W]; the border
    counts as outside for the erosion only where the mask does not reach it."""
    if size <= 1:
        return mask
    shape = mask.shape
    x = mask.reshape(-1, 1, *shape[-2:]).float()
    pad = size // 2
    dilated = F.max_pool2d(x, size, stride=1, padding=pad)
    eroded = -F.max_pool2d(F.pad(-dilated, (pad,) * 4, value=-1.0), size, stride=1)
    return (eroded > 0.5).reshape(shape)


def object_distance(pixels: torch.Tensor, obj: dict[str, Any]) -> torch.Tensor:
    """d_i(x) of pixels [3, ...] to an object record ({"colour", "texture"}): d(x, c) for a solid object,
    min_w d(x, [c, (c + w) / 2]) over the texture colours w for a textured one (antialiased blends in which
    the object's colour dominates)."""
    colour = rgb(obj["colour"])
    if obj.get("texture", "solid") == "solid":
        return colour_distance(pixels, colour[None])[0]
    return torch.stack([segment_distance(pixels, colour, (colour + rgb(w, TEXTURE_COLOURS)) / 2)
                        for w in TEXTURE_COLOURS]).amin(0)


def dilate(mask: torch.Tensor, size: int) -> torch.Tensor:
    """Dilation of bool masks [..., H, W] by a size x size square."""
    shape = mask.shape
    x = mask.reshape(-1, 1, *shape[-2:]).float()
    return (F.max_pool2d(x, size, stride=1, padding=size // 2) > 0.5).reshape(shape)


def object_masks(video: torch.Tensor, meta: dict[str, Any], closing: int = 3, reach: int = 5,
                 soft: bool = False) -> torch.Tensor:
    """Masks [N, T, H, W] of the N objects of a scene record (`meta["objects"]`: "colour", "texture") in one clip
    [3, T, H, W] in [-1, 1] (see the module doc): bool, or with `soft` float in [0, 1] with antialiased edges
    counted by their share α_i(x) = d_bg(x) / (d_bg(x) + d_i(x)) on the masks' boundary (the pixels a 3x3
    dilation adds or a 3x3 erosion removes)."""
    pixels = unit(video)
    objects = (meta or {}).get("objects") or []
    if not objects:
        raise ValueError("object_masks: the scene record has no 'objects'")
    distances = [object_distance(pixels, o) for o in objects]
    distances.append(background_distance(pixels, (meta or {}).get("background") or {}))
    distances.append(colour_distance(pixels, palette(list(TEXTURE_COLOURS), TEXTURE_COLOURS)).amin(0))
    label = torch.stack(distances).argmin(0)
    texture = label == len(objects) + 1
    masks = []
    for i, obj in enumerate(objects):
        mask = label == i
        if obj.get("texture", "solid") != "solid":
            mask = mask | (texture & dilate(mask, reach))
        masks.append(close(mask, closing))
    hard = torch.stack(masks)
    if not soft:
        return hard
    background = distances[len(objects)]
    alpha = torch.stack([background / (background + d).clamp_min(1e-6) for d in distances[: len(objects)]])
    boundary = dilate(hard, 3) & dilate(~hard, 3)
    return torch.where(boundary, alpha, hard.float())


def gradient_pairs() -> list[tuple[str, str]]:
    """The unordered pairs of background colours a gradient can join (names in BACKGROUND_COLOURS order)."""
    names = list(BACKGROUND_COLOURS)
    return [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]


def squared_distances(pixels: torch.Tensor, points: torch.Tensor, starts: torch.Tensor,
                      ends: torch.Tensor) -> torch.Tensor:
    """d² of pixels [N, 3] to points [P, 3] and to segments [starts_s, ends_s] ([S, 3] each) → [N, P + S], from
    dot products only (one matmul): with a the start, d = b − a and λ = clamp((x·d − a·d) / ‖d‖², 0, 1),
    ‖x − a − λd‖² = ‖x‖² − 2x·a + ‖a‖² − 2λ(x·d − a·d) + λ²‖d‖²."""
    directions = ends - starts
    basis = torch.cat([points, starts, directions]).to(pixels)
    dots = pixels @ basis.T
    p, s = len(points), len(starts)
    x2 = pixels.pow(2).sum(1, keepdim=True)
    to_points = x2 - 2 * dots[:, :p] + points.to(pixels).pow(2).sum(1)
    along = dots[:, p + s:] - (starts * directions).sum(1).to(pixels)
    length2 = directions.pow(2).sum(1).to(pixels).clamp_min(1e-12)
    lam = (along / length2).clamp(0, 1)
    to_starts = x2 - 2 * dots[:, p:p + s] + starts.to(pixels).pow(2).sum(1)
    to_segments = to_starts - 2 * lam * along + lam.pow(2) * length2
    return torch.cat([to_points, to_segments], dim=1).clamp_min(0)


BACKGROUND_LABEL, TEXTURE_LABEL = len(OBJECT_COLOURS), len(OBJECT_COLOURS) + 1
LEVELS = 64  # quantisation of each channel for the label table (steps of 1/63: 4 of 255 levels)


def nearest_labels(pixels: torch.Tensor) -> torch.Tensor:
    """label(x) of pixels [N, 3] in [0, 1] without a prompt: k < 8 for object colour k (the nearest of d(x, c_k)
    and d(x, [c_k, (c_k + w) / 2]) for the texture colours w), BACKGROUND_LABEL (a plain colour or a point of a
    gradient segment between two background colours is nearest), TEXTURE_LABEL (white or black is)."""
    objects = palette(list(OBJECT_COLOURS))
    textures = palette(list(TEXTURE_COLOURS), TEXTURE_COLOURS)
    backgrounds = palette(list(BACKGROUND_COLOURS), BACKGROUND_COLOURS)
    k, n_tex, n_bg = len(objects), len(textures), len(backgrounds)
    pairs = gradient_pairs()
    starts = torch.cat([objects.repeat_interleave(n_tex, 0),
                        torch.stack([rgb(a, BACKGROUND_COLOURS) for a, _ in pairs])])
    ends = torch.cat([(objects[:, None] + textures[None]).reshape(-1, 3) / 2,
                      torch.stack([rgb(e, BACKGROUND_COLOURS) for _, e in pairs])])
    d2 = squared_distances(pixels, torch.cat([objects, backgrounds, textures]), starts, ends)
    first_segment = k + n_bg + n_tex
    object_d = torch.minimum(d2[:, :k], d2[:, first_segment:first_segment + k * n_tex].reshape(-1, k, n_tex).amin(2))
    background_d = torch.cat([d2[:, k:k + n_bg], d2[:, first_segment + k * n_tex:]], 1).amin(1, keepdim=True)
    texture_d = d2[:, k + n_bg:first_segment].amin(1, keepdim=True)
    return torch.cat([object_d, background_d, texture_d], 1).argmin(1)


@lru_cache(maxsize=1)
def label_table() -> torch.Tensor:
    """`nearest_labels` of every colour of a LEVELS³ grid (uint8 [LEVELS³]), computed once."""
    axis = torch.arange(LEVELS, dtype=torch.float32) / (LEVELS - 1)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    return torch.cat([nearest_labels(chunk) for chunk in grid.split(65536)]).to(torch.uint8)


@lru_cache(maxsize=1)
def alpha_table() -> torch.Tensor:
    """α_k(x) = d_bg(x) / (d_bg(x) + d_k(x)) of every colour of the LEVELS³ grid for the 8 object colours
    (float16 [LEVELS³, 8]): the share of object colour k in a pixel blended from it and the background, with
    d_k and d_bg the distances of `nearest_labels`."""
    axis = torch.arange(LEVELS, dtype=torch.float32) / (LEVELS - 1)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    return torch.cat([_alphas(chunk) for chunk in grid.split(65536)]).to(torch.float16)


def _alphas(pixels: torch.Tensor) -> torch.Tensor:
    objects = palette(list(OBJECT_COLOURS))
    textures = palette(list(TEXTURE_COLOURS), TEXTURE_COLOURS)
    backgrounds = palette(list(BACKGROUND_COLOURS), BACKGROUND_COLOURS)
    k, n_tex, n_bg = len(objects), len(textures), len(backgrounds)
    pairs = gradient_pairs()
    starts = torch.cat([objects.repeat_interleave(n_tex, 0),
                        torch.stack([rgb(a, BACKGROUND_COLOURS) for a, _ in pairs])])
    ends = torch.cat([(objects[:, None] + textures[None]).reshape(-1, 3) / 2,
                      torch.stack([rgb(e, BACKGROUND_COLOURS) for _, e in pairs])])
    d = squared_distances(pixels, torch.cat([objects, backgrounds, textures]), starts, ends).sqrt()
    first_segment = k + n_bg + n_tex
    object_d = torch.minimum(d[:, :k], d[:, first_segment:first_segment + k * n_tex].reshape(-1, k, n_tex).amin(2))
    background_d = torch.cat([d[:, k:k + n_bg], d[:, first_segment + k * n_tex:]], 1).amin(1, keepdim=True)
    return background_d / (background_d + object_d).clamp_min(1e-6)


def soft_colour_masks(video: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Soft masks [B, K, T, H, W] ∈ [0, 1]: 1 inside the hard masks [B, K, T, H, W] (`colour_masks`), α_k(x)
    (`alpha_table`) on their boundary (the pixels a 3x3 dilation adds or a 3x3 erosion removes), 0 elsewhere:
    antialiased edges count by their share, so centroids move by fractions of a pixel."""
    q = (unit(video) * (LEVELS - 1)).round().long()
    index = (q[:, 0] * LEVELS + q[:, 1]) * LEVELS + q[:, 2]  # [B, T, H, W]
    alpha = alpha_table().to(video.device)[index].float().permute(0, 4, 1, 2, 3)  # [B, K, T, H, W]
    boundary = dilate(masks, 3) & dilate(~masks, 3)
    return torch.where(boundary, alpha, masks.float())


def palette_labels(video: torch.Tensor) -> torch.Tensor:
    """`nearest_labels` of clips [B, 3, T, H, W] in [-1, 1] → int64 [B, T, H, W], read from `label_table` at the
    nearest grid colour (≤ 2 of 255 levels away per channel)."""
    q = (unit(video) * (LEVELS - 1)).round().long()
    index = (q[:, 0] * LEVELS + q[:, 1]) * LEVELS + q[:, 2]
    return label_table().to(video.device)[index].long()


def colour_masks(video: torch.Tensor, closing: int = 3, reach: int = 5) -> torch.Tensor:
    """Bool masks [B, K, T, H, W] of the K = 8 object colours in clips [B, 3, T, H, W] in [-1, 1] without a
    prompt: from label = `palette_labels`, mask_k = close(label = k ∪ (label = texture ∩ dilate_reach(label = k)))."""
    label = palette_labels(video)
    k = len(OBJECT_COLOURS)
    masks = label[:, None] == torch.arange(k, device=label.device).view(1, k, 1, 1, 1)
    masks = masks | ((label == TEXTURE_LABEL)[:, None] & dilate(masks, reach))
    return close(masks, closing)
