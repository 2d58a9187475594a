"""Automatic evaluation on the synthetic shapes world: a probe that reads clips through the world's palette, and
the metrics built on it (text alignment per attribute; Fréchet distance beside its real-vs-real floor).

Attributes and their classes (A = shape, colour, motion, background):

- colour: the 8 object colours; motion: still, bounce, fall, orbit;
- shape: the world's shapes up to rotation. The world draws every object at a uniformly random angle, so two
  shapes whose outlines are rotations of each other cannot be told apart by anyone: they form one class (today
  "square/diamond": the world's diamond is its square turned by 45°). `SHAPE_CLASS` is computed from the
  world's polygons, so a world that makes them differ gets them back as classes of their own.
- background: one class per clip: "plain <c>", "<a> to <b> gradient" or "photo <name>". A gradient's two colours
  count as an unordered pair: a → b at angle θ renders exactly as b → a at θ + 180°, so the prompt's order is
  not in the pixels. "Correct" = kind and colour(s) both right.

The probe (`VideoProbe`) has a fixed front end and small trained heads:

    label(x)      nearest palette entry of each pixel (palette.palette_labels): an object colour, background
                  (a plain colour or a point of a gradient segment), or texture (white/black); per object colour
                  k a mask (palette.colour_masks); for the colours seen (candidates), soft masks M_k,t
                  (palette.object_masks of the scene read so far: those colours on the best-fitting background
                  model; antialiased edges count by their share, so centroids are precise to a fraction of a pixel)
    presence_k    MLP(log mean_t a_k,t, log max_t a_k,t, log min_t a_k,t, fraction of frames with a_k,t > 0.5%)
                  (a = area fraction) → P(colour k in the clip) = σ(presence_k)
    shape_k       a CNN on crops of M_k,t and of the foreground (label ≠ background: the outline of a textured
                  object survives there) centred on M_k,t's centroid and scaled by its radius of gyration, mean
                  log-softmax over frames (rotated and mirrored at random in training: shape is invariant to both)
    motion_k      MLP(world_measures.track_features of the centroid track of M_k, area CV, log mean area, and the
                  one-hot decision of the hand-made classifier world_measures.motion_rule)
    background    −α·r_m + β (+ γ·coverage_m for gradients) + MLP(features): r_m the mean distance of the
                  background pixels to each plain colour / gradient segment m, coverage_m = min(fraction near
                  a, fraction near b) of the pixels along the segment a → b, plus spatial std, Laplacian energy
                  and mean colour (photos)

Clip scores per attribute, for ranking: score_a(v) = max_k P(k)·p_a,k(v) (shape, motion), P(k) (colour),
softmax(background)(v). Text alignment of a clip for attribute a: with m = the number of distinct values of a
in the prompt (1 for background), the fraction of those values among the m best-scored, averaged over clips
(top-1 accuracy for one object). `alignment` is the mean over attributes; `alignment_real` is the same on the
batch's real held-out clips (the ceiling).

Training: L = BCE(presence, colours) + Σ_objects [CE(shape_k, shape) + CE(motion_k, motion)] + CE(background),
on features extracted once from `clips` training clips (then `steps` minibatches of `batch` clips).

Features for the Fréchet distance (F = 8 + 3e, e = (features − 8) // 3): [P(k) for the 8 colours,
Σ_k P(k)·shape embedding_k, Σ_k P(k)·motion embedding_k, background embedding] (embeddings of width e are the
heads' bottlenecks). FD: see `frechet.py`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from datamodules.synthetic.world import MOTIONS, OBJECT_COLOURS, PHOTOS, SHAPES, shape_vertices
from lightning_modules.evaluation.base import Evaluator, cached_network
from lightning_modules.evaluation.frechet import FrechetWithFloor
from lightning_modules.evaluation.palette import (
    BACKGROUND_COLOURS,
    BACKGROUND_LABEL,
    colour_masks,
    gradient_pairs,
    object_masks,
    palette,
    palette_labels,
    rgb,
    squared_distances,
    unit,
)
from lightning_modules.evaluation.world_measures import centroids, motion_rule, track_features

# ----------------------------------------------------------------------------------------------------------------
# classes


def _outline(shape: str) -> tuple:
    """A rotation-invariant signature of a shape's outline: the cyclic sequence of (vertex radius, angle to the
    next vertex), rotated to its smallest form; ("circle",) for the circle."""
    vertices = shape_vertices(shape)
    if vertices is None:
        return ("circle",)
    polar = sorted((math.atan2(y, x) % (2 * math.pi), math.hypot(x, y)) for x, y in vertices)
    steps = [(round(r, 4), round((polar[(i + 1) % len(polar)][0] - a) % (2 * math.pi), 4))
             for i, (a, r) in enumerate(polar)]
    return min(tuple(steps[i:] + steps[:i]) for i in range(len(steps)))


def _shape_classes() -> dict[str, str]:
    """shape → its class: the shapes with one outline up to rotation, joined by "/" (see the module doc)."""
    groups: dict[tuple, list[str]] = {}
    for shape in SHAPES:
        groups.setdefault(_outline(shape), []).append(shape)
    return {shape: "/".join(members) for members in groups.values() for shape in members}


SHAPE_CLASS: dict[str, str] = _shape_classes()
SHAPE_CLASSES: tuple[str, ...] = tuple(dict.fromkeys(SHAPE_CLASS.values()))
BACKGROUND_CLASSES: tuple[str, ...] = (
    *(f"plain {c}" for c in BACKGROUND_COLOURS),
    *(f"{a} to {b} gradient" for a, b in gradient_pairs()),
    *(f"photo {p}" for p in PHOTOS),
)
ATTRIBUTES: dict[str, tuple[str, ...]] = {"shape": SHAPE_CLASSES, "colour": tuple(OBJECT_COLOURS), "motion": MOTIONS,
                                          "background": BACKGROUND_CLASSES}
COLOURS = tuple(OBJECT_COLOURS)
_PAIRS = gradient_pairs()
MIN_AREA = 0.005  # area fraction above which a colour counts as seen in a frame


def background_class(background: dict[str, Any] | None) -> str | None:
    """The class of a world background record ({"kind", "colours", "photo"}), None if it has none."""
    background = background or {}
    kind, colours = background.get("kind"), list(background.get("colours") or [])
    if kind == "plain" and colours:
        return f"plain {colours[0]}"
    if kind == "gradient" and len(colours) >= 2:
        a, b = sorted(colours[:2], key=list(BACKGROUND_COLOURS).index)
        return f"{a} to {b} gradient"
    if kind == "photo" and background.get("photo") in PHOTOS:
        return f"photo {background['photo']}"
    return None


def attribute_targets(metas: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Multi-hot [B, K_a] per attribute from the world's json ground truth ("objects": [{shape, colour, motion}],
    "background"); a row of zeros where the record lacks the attribute (e.g. no background)."""
    targets = {a: torch.zeros(len(metas), len(values)) for a, values in ATTRIBUTES.items()}
    for i, meta in enumerate(metas):
        objects = (meta or {}).get("objects") or []
        if not objects:
            raise ValueError(f"probe: sample {i} has no 'objects' in its json (not a shapes-world scene)")
        for obj in objects:
            values = {"shape": SHAPE_CLASS.get(obj.get("shape")), "colour": obj.get("colour"),
                      "motion": obj.get("motion")}
            for a, value in values.items():
                if value in ATTRIBUTES[a]:
                    targets[a][i, ATTRIBUTES[a].index(value)] = 1.0
        label = background_class(meta.get("background"))
        if label is not None:
            targets["background"][i, BACKGROUND_CLASSES.index(label)] = 1.0
    return targets


def topk_alignment(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per attribute, per sample: |top-k(logits) ∩ true values| / k with k = number of true values → [B]
    (rows without true values score 0; leave them out of means)."""
    out = {}
    for a, target in targets.items():
        if a not in logits:
            continue
        target = target.to(logits[a].device)
        k = target.sum(1).long().clamp_min(1)
        order = logits[a].argsort(dim=1, descending=True)
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
        hits = ((ranks < k[:, None]) & (target > 0)).sum(1)
        out[a] = hits.float() / k.float()
    return out


def clip_alignment(probe: VideoProbe, video: torch.Tensor, metas: Sequence[dict[str, Any]], fps: Any) -> torch.Tensor:
    """Per clip [B]: the mean of `topk_alignment` over the attributes its json names (its prompt relevance as the
    probe reads it; the Animated Stickers judges use it)."""
    with torch.no_grad():
        out = probe.outputs(extract(video.float().clamp(-1, 1), fps=fps))
    targets = attribute_targets(metas)
    hits = topk_alignment(out["scores"], targets)
    present = torch.stack([targets[a].sum(1) > 0 for a in hits], 1).float()
    values = torch.stack([hits[a].cpu() for a in hits], 1)
    return (values * present).sum(1) / present.sum(1).clamp_min(1.0)


def chance_alignment(targets: dict[str, torch.Tensor]) -> dict[str, float]:
    """Expected alignment of a scorer that ranks values at random: k / K_a per clip (k true of K_a values),
    averaged over the clips that have the attribute."""
    out = {}
    for a, target in targets.items():
        k = target.sum(1)
        rows = k > 0
        if rows.any():
            out[a] = float((k[rows] / target.shape[1]).mean())
    return out


# ----------------------------------------------------------------------------------------------------------------
# the fixed front end: palette masks, tracks, background statistics


@dataclass
class ClipFeatures:
    """What the heads read of one clip: presence statistics [K, 4] of the K object colours; the candidate colours
    (the ones the shape and motion heads look at), their masks with the clip's foreground (not background)
    [N, 2, T, H, W] and motion features [N, MOTION_FEATURES];
    background features [BACKGROUND_FEATURES]; and, for training, the targets."""

    presence: torch.Tensor
    candidates: list[int]
    masks: torch.Tensor
    motion: torch.Tensor
    background: torch.Tensor
    targets: dict[str, Any] = field(default_factory=dict)
    fps: float = 8.0


BACKGROUND_FEATURES = len(BACKGROUND_COLOURS) + 2 * len(_PAIRS) + 5


def background_features(clip: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Features [BACKGROUND_FEATURES] of the background of a clip [3, T, H, W] in [-1, 1] with labels [T, H, W]
    (first and last frame): r_m = mean_x d(x, m) over background pixels x for the 7 plain colours and the 21
    gradient segments; coverage of each segment a → b: min(fraction with λ < ¼, fraction with λ > ¾), λ the
    position along the segment; spatial std; mean |4-neighbour Laplacian| where the 3x3 window is background;
    mean colour."""
    frames = sorted({0, clip.shape[1] - 1})
    x = unit(clip[:, frames])  # [3, F, H, W]
    background = label[frames] == BACKGROUND_LABEL
    pixels = x.permute(1, 2, 3, 0)[background]
    if len(pixels) < 4:  # no background seen: use every pixel
        pixels = x.permute(1, 2, 3, 0).reshape(-1, 3)
    plains = palette(list(BACKGROUND_COLOURS), BACKGROUND_COLOURS)
    starts = torch.stack([rgb(a, BACKGROUND_COLOURS) for a, _ in _PAIRS])
    ends = torch.stack([rgb(b, BACKGROUND_COLOURS) for _, b in _PAIRS])
    distances = squared_distances(pixels, plains, starts, ends).sqrt().mean(0)
    direction = ends - starts
    lam = ((pixels[:, None] - starts[None]) * direction[None]).sum(-1) / direction.pow(2).sum(-1)
    coverage = torch.minimum((lam < 0.25).float().mean(0), (lam > 0.75).float().mean(0))
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
    laplacian = F.conv2d(x.transpose(0, 1).reshape(-1, 1, *x.shape[-2:]), kernel[None, None], padding=1).abs()
    inner = -F.max_pool2d(-background.float()[:, None], 3, stride=1, padding=1)
    inner = inner.repeat_interleave(3, 0) > 0.5
    energy = laplacian[inner].mean() if inner.any() else laplacian.mean()
    return torch.cat([distances, coverage, pixels.std(0).mean()[None], energy[None], pixels.mean(0)])


def estimated_background(features: torch.Tensor) -> dict[str, Any]:
    """A background record guessed from `background_features` for the soft masks: the best-fitting gradient
    segment if it fits clearly better (by 0.02) than the best-fitting plain colour, else that plain colour."""
    n_plain, n_pair = len(BACKGROUND_COLOURS), len(_PAIRS)
    plain, gradient = features[:n_plain], features[n_plain:n_plain + n_pair]
    if float(gradient.min()) < float(plain.min()) - 0.02:
        return {"kind": "gradient", "colours": list(_PAIRS[int(gradient.argmin())])}
    return {"kind": "plain", "colours": [list(BACKGROUND_COLOURS)[int(plain.argmin())]]}


def extract(video: torch.Tensor, metas: Sequence[dict[str, Any]] | None = None, fps: Any = None,
            max_candidates: int = 3) -> list[ClipFeatures]:
    """The front end on clips [B, 3, T, H, W] in [-1, 1] at `fps` (a number or [B]; None: 8) (see the module
    doc). Candidates: the colours of the `max_candidates` largest mean areas among those seen (area fraction >
    MIN_AREA) in some frame, and, with `metas` (training), every colour of the scene's objects, which also gives
    the targets. The candidates' soft masks are `palette.object_masks` of the scene the front end reads: the
    candidate colours (textured) on the background of `estimated_background`."""
    video = video.detach().float().cpu()
    fps_list = [float(f) for f in torch.as_tensor(8.0 if fps is None else fps, dtype=torch.float64)
                .expand(video.shape[0])]
    hard = colour_masks(video)  # [B, K, T, H, W]
    labels = palette_labels(video)
    height, width = video.shape[-2:]
    out = []
    for i in range(video.shape[0]):
        area = hard[i].float().mean((-2, -1))  # [K, T]
        presence = torch.stack([area.mean(1).add(1e-3).log(), area.amax(1).add(1e-3).log(),
                                area.amin(1).add(1e-3).log(), (area > MIN_AREA).float().mean(1)], dim=1)
        seen = area.amax(1) > MIN_AREA
        order = [int(k) for k in area.mean(1).argsort(descending=True) if seen[k]][:max_candidates]
        targets: dict[str, Any] = {}
        if metas is not None:
            objects = metas[i].get("objects") or []
            colours = [o.get("colour") for o in objects]
            for colour in colours:
                if colour in COLOURS and COLOURS.index(colour) not in order:
                    order.append(COLOURS.index(colour))
            # shape and motion are learnt from objects whose colour is theirs alone
            targets["objects"] = {COLOURS.index(o["colour"]): (SHAPE_CLASSES.index(SHAPE_CLASS[o["shape"]]),
                                                               MOTIONS.index(o["motion"]))
                                  for o in objects if colours.count(o["colour"]) == 1 and o.get("motion") in MOTIONS
                                  and o.get("shape") in SHAPE_CLASS}
            targets["colours"] = torch.tensor([float(c in colours) for c in COLOURS])
            label = background_class(metas[i].get("background"))
            targets["background"] = BACKGROUND_CLASSES.index(label) if label is not None else -1
        background = background_features(video[i], labels[i])
        if order:
            scene = {"objects": [{"colour": COLOURS[k], "texture": "any"} for k in order],
                     "background": estimated_background(background)}
            soft = object_masks(video[i], scene, soft=True)  # [N, T, H, W]
            motion = torch.stack([_motion_features(m, height, width, fps_list[i]) for m in soft])
        else:
            soft, motion = torch.zeros(0, *video.shape[2:]), torch.zeros(0, MOTION_FEATURES)
        foreground = (labels[i] != BACKGROUND_LABEL).float().expand(len(order), -1, -1, -1)
        candidate_masks = torch.stack([soft, foreground], dim=1).half()  # [N, 2, T, H, W]
        out.append(ClipFeatures(presence, order, candidate_masks, motion, background, targets, fps_list[i]))
    return out


MOTION_FEATURES = 9 + len(MOTIONS)


def _motion_features(masks: torch.Tensor, height: int, width: int, fps: float) -> torch.Tensor:
    """[speed, orbit, log line, sharpness, gravity, cosine, speed CV, area CV, log mean area, one-hot motion_rule]
    of one colour's masks [T, H, W] (see world_measures.track_features, motion_rule), clamped to moderate ranges."""
    track, area = centroids(masks)
    f = track_features(track, height, width, fps)
    fraction = area / (height * width)
    cv = float(area.std(unbiased=False) / area.mean()) if area.mean() > 0 else 2.0
    rule = [float(motion_rule(f) == m) for m in MOTIONS]
    return torch.tensor([min(f["speed"], 3.0), min(f["orbit"], 2.0), math.log(min(max(f["line"], 1e-3), 1e3)),
                         min(f["sharpness"], 3.0), max(min(f["gravity"], 3.0), -3.0), f["cosine"],
                         min(f["speed_cv"], 2.0), min(cv, 2.0),
                         math.log(float(fraction.mean()) + 1e-3), *rule], dtype=torch.float32)


def crops(masks: torch.Tensor, size: int, frames: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Crops [N, F, C, size, size] of masks [N, C, T, H, W] (channel 0: the object's): F frames (evenly spaced;
    random ones with `generator`, which also turns and mirrors each crop at random), each centred on channel 0's
    centroid c and spanning ±1.8·ρ with ρ = √(2·mean_p ‖p − c‖²) (the radius of a disk of the same spread)."""
    n, channels, t, height, width = masks.shape
    if generator is None:
        index = torch.linspace(0, t - 1, min(frames, t)).round().long().expand(n, -1)
    else:
        index = torch.randint(0, t, (n, frames), generator=generator)
    frames = index.shape[1]
    picked = masks.float().gather(2, index[:, None, :, None, None].expand(-1, channels, -1, height, width))
    picked = picked.transpose(1, 2).reshape(-1, channels, height, width)  # [N·F, C, H, W]
    m = picked[:, 0]
    track, area = centroids(m)
    track = track.nan_to_num(0.0)
    ys = torch.arange(height, dtype=m.dtype) + 0.5
    xs = torch.arange(width, dtype=m.dtype) + 0.5
    dx2 = ((xs[None, :] - track[:, 0:1]) ** 2)[:, None, :]
    dy2 = ((ys[None, :] - track[:, 1:2]) ** 2)[:, :, None]
    spread = ((dx2 + dy2) * m).sum((-2, -1)) / area.clamp_min(1.0)
    half = 1.8 * (2 * spread).sqrt().clamp_min(1.0)  # pixels
    angle = torch.zeros(len(m))
    flip = torch.ones(len(m))
    if generator is not None:
        angle = torch.rand(len(m), generator=generator) * 2 * math.pi
        flip = torch.where(torch.rand(len(m), generator=generator) < 0.5, -1.0, 1.0)
        half = half * (0.9 + 0.2 * torch.rand(len(m), generator=generator))
    cos, sin = angle.cos(), angle.sin()
    # output (u, v) ∈ [−1, 1]² ↦ input pixel c + half·R(u·flip, v), in grid_sample's normalised coordinates
    theta = torch.zeros(len(m), 2, 3)
    theta[:, 0, 0] = half * cos * flip * 2 / width
    theta[:, 0, 1] = -half * sin * 2 / width
    theta[:, 1, 0] = half * sin * flip * 2 / height
    theta[:, 1, 1] = half * cos * 2 / height
    theta[:, 0, 2] = track[:, 0] * 2 / width - 1
    theta[:, 1, 2] = track[:, 1] * 2 / height - 1
    grid = F.affine_grid(theta, [len(m), 1, size, size], align_corners=False)
    out = F.grid_sample(picked, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.reshape(n, frames, channels, size, size)


# ----------------------------------------------------------------------------------------------------------------
# the trained heads


@dataclass
class ProbeConfig:
    """Probe size and training. width: channels of the shape CNN's first conv; features: F for the Fréchet
    distance (rounded down to 8 + 3e); steps x batch clips drawn from the features of `clips` training clips
    (fewer if steps x batch is smaller); crop: side of the shape crops; frames: crops per object in training."""

    width: int = 16
    features: int = 32
    steps: int = 600
    lr: float = 2e-3
    seed: int = 0
    clips: int = 1024
    batch: int = 32
    crop: int = 16
    frames: int = 4


class VideoProbe(nn.Module):
    """The heads of the module doc on `extract`'s front end. `forward(video)` → Fréchet features [B, F];
    `classify(video)` → clip scores (logits) per attribute; `outputs(features)` → everything, for training."""

    def __init__(self, width: int = 16, features: int = 32, crop: int = 16) -> None:
        super().__init__()
        self.crop = crop
        self.register_buffer("fps", torch.tensor(8.0))  # frame rate of the training clips (motion features)
        e = max(2, (features - len(COLOURS)) // 3)
        self.embedding = e
        self.num_features = len(COLOURS) + 3 * e  # read by torchmetrics' FID
        self.presence = nn.Sequential(nn.Linear(4, 16), nn.GELU(), nn.Linear(16, 1))
        self.colour_bias = nn.Parameter(torch.zeros(len(COLOURS)))
        c1, c2, c3 = width, 2 * width, 4 * width

        def conv(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(4, cout), nn.GELU()]

        self.shape_body = nn.Sequential(*conv(2, c1, 1), *conv(c1, c2, 2), *conv(c2, c2, 1), *conv(c2, c3, 2),
                                        *conv(c3, c3, 1))
        self.shape_embed = nn.Sequential(nn.Linear(2 * c3, 64), nn.GELU(), nn.Linear(64, e), nn.GELU())
        self.shape_head = nn.Linear(e, len(SHAPE_CLASSES))
        self.motion_embed = nn.Sequential(nn.Linear(MOTION_FEATURES, 64), nn.GELU(), nn.Linear(64, e), nn.GELU())
        self.motion_head = nn.Linear(e, len(MOTIONS))
        # background: structured scores of the plain / gradient models + an MLP for the rest (photos)
        # (log-scales: Adam's steps of ~lr move them by a fraction, not by an absolute amount)
        self.log_scales = nn.Parameter(torch.tensor([50.0, 50.0, 10.0]).log())  # plain, gradient, coverage
        self.kind_bias = nn.Parameter(torch.zeros(3))
        self.background_embed = nn.Sequential(nn.Linear(BACKGROUND_FEATURES, 64), nn.GELU(), nn.Linear(64, e),
                                              nn.GELU())
        self.background_head = nn.Linear(e, len(BACKGROUND_CLASSES))
        nn.init.zeros_(self.background_head.weight)
        nn.init.zeros_(self.background_head.bias)

    def shape_logits(self, masks: Sequence[torch.Tensor], frames: int = 8,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probabilities [N, S] averaged over crops, embedding [N, e]) of the candidates in a list of mask
        tensors [N_i, 2, T_i, H_i, W_i] (clips of one size are cropped together)."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, m in enumerate(masks):
            groups.setdefault(tuple(m.shape[1:]), []).append(i)
        parts, order = [], []
        for members in groups.values():
            parts.append(crops(torch.cat([masks[i] for i in members]), self.crop, frames, generator))
            order += [(i, j) for i in members for j in range(len(masks[i]))]
        logps, embs = [], []
        for x in parts:  # [N, F, 2, s, s]
            n, f = x.shape[:2]
            h = self.shape_body(x.reshape(n * f, *x.shape[2:]).to(self.colour_bias))
            emb = self.shape_embed(torch.cat([h.mean((-2, -1)), h.amax((-2, -1))], dim=1))
            logps.append(self.shape_head(emb).log_softmax(-1).reshape(n, f, -1).mean(1))
            embs.append(emb.reshape(n, f, -1).mean(1))
        # back to the order of the list: clip by clip, candidate by candidate
        position = {key: k for k, key in enumerate(order)}
        index = torch.tensor([position[(i, j)] for i, m in enumerate(masks) for j in range(len(m))],
                             device=self.colour_bias.device)
        return torch.cat(logps)[index], torch.cat(embs)[index]

    def background_logits(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [B, 30], embedding [B, e]) of background features [B, BACKGROUND_FEATURES]."""
        n_plain, n_pair = len(BACKGROUND_COLOURS), len(_PAIRS)
        distances, coverage = features[:, : n_plain + n_pair], features[:, n_plain + n_pair: n_plain + 2 * n_pair]
        plain_scale, gradient_scale, coverage_scale = self.log_scales.exp()
        plain = -plain_scale * distances[:, :n_plain] + self.kind_bias[0]
        gradient = -gradient_scale * distances[:, n_plain:] + coverage_scale * coverage + self.kind_bias[1]
        photo = self.kind_bias[2].expand(len(features), len(PHOTOS))
        emb = self.background_embed(features)
        return torch.cat([plain, gradient, photo], dim=1) + self.background_head(emb), emb

    def outputs(self, clips: Sequence[ClipFeatures], generator: torch.Generator | None = None,
                frames: int = 8) -> dict[str, torch.Tensor]:
        """Per clip: presence logits [B, K], background logits [B, 30], attribute scores and features; per
        candidate (concatenated over clips): shape and motion log-probabilities, with their clip index and colour."""
        device = self.colour_bias.device
        presence = torch.stack([c.presence for c in clips]).to(device)
        presence_logits = self.presence(presence)[..., 0] + self.colour_bias
        p = presence_logits.sigmoid()
        owner = torch.tensor([i for i, c in enumerate(clips) for _ in c.candidates], dtype=torch.long)
        colour = torch.tensor([k for c in clips for k in c.candidates], dtype=torch.long)
        e = self.embedding
        if len(owner):
            shape_logp, shape_emb = self.shape_logits([c.masks.to(device) for c in clips], frames, generator)
            motion_emb = self.motion_embed(torch.cat([c.motion for c in clips]).to(device))
            motion_logp = self.motion_head(motion_emb).log_softmax(-1)
        else:
            shape_logp = torch.zeros(0, len(SHAPE_CLASSES), device=device)
            motion_logp = torch.zeros(0, len(MOTIONS), device=device)
            shape_emb = motion_emb = torch.zeros(0, e, device=device)
        owner, colour = owner.to(device), colour.to(device)
        weight = p[owner, colour] if len(owner) else torch.zeros(0, device=device)
        background_logits, background_emb = self.background_logits(
            torch.stack([c.background for c in clips]).to(device))

        def clip_max(logp: torch.Tensor) -> torch.Tensor:
            """score(v) = max over the clip's candidates of P(k)·p(v), as a log."""
            scores = torch.full((len(clips), logp.shape[1]), 1e-6, device=device)
            if len(owner):
                values = weight[:, None] * logp.exp()
                scores = scores.scatter_reduce(0, owner[:, None].expand_as(values), values, "amax")
            return scores.log()

        def clip_sum(emb: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(len(clips), e, device=device)
            return out.index_add(0, owner, weight[:, None] * emb) if len(owner) else out

        features = torch.cat([p, clip_sum(shape_emb), clip_sum(motion_emb), background_emb], dim=1)
        return {"presence": presence_logits, "background": background_logits, "shape_logp": shape_logp,
                "motion_logp": motion_logp, "owner": owner, "colour": colour, "features": features,
                "scores": {"shape": clip_max(shape_logp), "colour": presence_logits, "motion": clip_max(motion_logp),
                           "background": background_logits}}

    def forward(self, video: torch.Tensor, fps: Any = None) -> torch.Tensor:
        """video [B, 3, T, H, W] in [-1, 1] at `fps` (None: the training clips' rate) → Fréchet features [B, F]."""
        return self.outputs(extract(video, fps=self.fps.item() if fps is None else fps))["features"]

    def classify(self, video: torch.Tensor, fps: Any = None) -> dict[str, torch.Tensor]:
        """video [B, 3, T, H, W] in [-1, 1] at `fps` (None: the training clips' rate) → clip scores (logits)
        [B, K_a] per attribute of ATTRIBUTES."""
        return self.outputs(extract(video, fps=self.fps.item() if fps is None else fps))["scores"]


def probe_loss(probe: VideoProbe, clips: Sequence[ClipFeatures], generator: torch.Generator | None = None,
               frames: int = 4) -> torch.Tensor:
    """L of the module doc on a batch of extracted training clips."""
    out = probe.outputs(clips, generator, frames)
    device = out["presence"].device
    loss = F.binary_cross_entropy_with_logits(out["presence"],
                                              torch.stack([c.targets["colours"] for c in clips]).to(device))
    background = torch.tensor([c.targets["background"] for c in clips], device=device)
    if (background >= 0).any():
        loss = loss + F.cross_entropy(out["background"][background >= 0], background[background >= 0])
    rows, shapes, motions = [], [], []
    for j, (i, k) in enumerate(zip(out["owner"].tolist(), out["colour"].tolist())):
        target = clips[i].targets["objects"].get(k)
        if target is not None:
            rows.append(j)
            shapes.append(target[0])
            motions.append(target[1])
    if rows:
        rows_t = torch.tensor(rows, device=device)
        loss = loss + F.nll_loss(out["shape_logp"][rows_t], torch.tensor(shapes, device=device))
        loss = loss + F.nll_loss(out["motion_logp"][rows_t], torch.tensor(motions, device=device))
    return loss


def extract_batches(batches: Iterable[dict[str, Any]], clips: int) -> list[ClipFeatures]:
    """`extract` (with targets) on batches with "video" and "meta" until `clips` clips (single images skipped)."""
    out: list[ClipFeatures] = []
    for batch in batches:
        video = batch["video"]
        if video.shape[2] < 3:
            continue
        out.extend(extract(video, batch["meta"], batch.get("fps")))
        if len(out) >= clips:
            break
    return out[:clips]


def train_probe(batches: Iterable[dict[str, Any]], config: ProbeConfig, device: torch.device | str = "cpu") -> VideoProbe:
    """Extract min(clips, steps x batch) training clips from batches with "video" and "meta" (real clips), then
    train the heads for `config.steps` minibatches; returns the probe in eval mode. Gradients are enabled here
    even inside an evaluation loop's inference mode."""
    with torch.inference_mode(False), torch.enable_grad():
        data = extract_batches(batches, min(config.clips, config.steps * config.batch))
        return fit_probe(data, config, device)


def fit_probe(data: Sequence[ClipFeatures], config: ProbeConfig, device: torch.device | str = "cpu") -> VideoProbe:
    """Train the heads on extracted clips (AdamW, one-cycle learning rate, minibatches drawn without replacement
    within each pass)."""
    if not data:
        raise ValueError("train_probe: no training clips (need clips of 3 or more frames with the world's json)")
    with torch.inference_mode(False), torch.enable_grad():
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(config.seed)
        probe = VideoProbe(config.width, config.features, config.crop).to(device)
        probe.fps.fill_(float(torch.tensor([c.fps for c in data]).median()))
        torch.random.set_rng_state(generator_state)
        generator = torch.Generator().manual_seed(config.seed)
        optimizer = torch.optim.AdamW(probe.parameters(), lr=config.lr, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=config.steps,
                                                       pct_start=0.1)
        order: list[int] = []
        for _ in range(config.steps):
            if len(order) < config.batch:
                order += torch.randperm(len(data), generator=generator).tolist()
            chosen, order = order[: config.batch], order[config.batch:]
            loss = probe_loss(probe, [data[i] for i in chosen], generator, config.frames)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return probe.eval().requires_grad_(False)


def _video_source(datamodule: Any) -> Any:
    # a latent cache (datamodules/latents.py) holds no pixels: the probe trains on the clips it was encoded from
    datamodule = getattr(datamodule, "source", None) or datamodule
    datamodule.setup("fit")
    source = next((s for s in datamodule.sources(train=True) if s.name != "image"), None)
    if source is None:
        raise ValueError(f"probe: {type(datamodule).__name__} has no video source to train the probe on")
    return source


def available_clips(datamodule: Any) -> int | None:
    """The number of clips of the datamodule's first video source (None if its shards do not say)."""
    from datamodules.shards import count_samples

    return count_samples(_video_source(datamodule).shards)


def train_batches(datamodule: Any, batches: int, seed: int = 0) -> Iterable[dict[str, Any]]:
    """`batches` batches of the datamodule's training clips (its first video source), shuffled by `seed`."""
    from datamodules.stream_dataset import StreamDataset
    from datamodules.stream_loader import ShardLoader

    dataset = StreamDataset([_video_source(datamodule)], seed=seed, shuffle=True, shuffle_buffer=128)
    return iter(ShardLoader(dataset, max(1, batches), num_workers=min(1, int(getattr(datamodule, "num_workers", 0)))))


def probe_from_datamodule(datamodule: Any, config: ProbeConfig, cache_dir: str | Path | None,
                          device: torch.device | str = "cpu") -> VideoProbe:
    """The probe for a shard datamodule's training clips (its first video source), trained once and cached as
    `<cache_dir>/probe-<hash>.pt` (hash of the shards, the bucket table, the probe version and `config`)."""
    source = _video_source(datamodule)
    table = getattr(source.handler, "table", None)
    buckets = sorted(b.name for b in table.buckets.values()) if table is not None else []

    def train() -> VideoProbe:
        clips = min(config.clips, config.steps * config.batch, available_clips(datamodule) or config.clips)
        batch_size = int(getattr(datamodule, "batch_size", 8) or 8)
        with torch.inference_mode(False), torch.enable_grad():
            data = extract_batches(train_batches(datamodule, 2 * math.ceil(clips / batch_size) + 2, config.seed),
                                   clips)
            return fit_probe(data, config, device)

    key = {"shards": source.shards, "buckets": buckets, "config": asdict(config), "version": 4}
    probe = cached_network(cache_dir, "probe", key, train, lambda _: VideoProbe(config.width, config.features,
                                                                                config.crop))
    return probe.to(device).eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------------
# the evaluator


class ProbeEvaluator(Evaluator):
    """Text alignment per attribute and the Fréchet distance of samples, judged by a probe trained on the
    datamodule's real clips (see the module doc).

    Logs alignment_<a> and alignment_real_<a> for a in shape, colour, motion, background; alignment and
    alignment_real (their means); fd (samples vs the held-out real clips), fd_real_floor (train clips vs the
    same held-out clips, as many as there are samples: the floor FD can reach with this many clips) and
    fd_samples (that count); see `frechet.FrechetWithFloor`. Needs batches with "video" and the world's "meta"
    (shapes-world scenes); other batches and single images are skipped. Under `trainer.fast_dev_run` (a wiring
    check) the probe is not trained.

    Args:
        cache_dir: where trained probes are kept (None: not cached); width, features, steps, lr, clips, batch,
            seed: `ProbeConfig` (another seed trains, and caches, another probe: how much a sample score owes to
            the probe instance). floor_clips: training clips read for the floor (at most this many samples count).
    """

    def __init__(self, cache_dir: str | None = None, width: int = 16, features: int = 32, steps: int = 600,
                 lr: float = 2e-3, clips: int = 1024, batch: int = 32, floor_clips: int = 128,
                 seed: int = 0) -> None:
        self.cache_dir = cache_dir
        self.config = ProbeConfig(width=width, features=features, steps=steps, lr=lr, seed=seed, clips=clips,
                                  batch=batch)
        self.floor_clips = floor_clips
        self.probe: VideoProbe | None = None
        self.frechet: FrechetWithFloor | None = None
        self.scores: dict[str, list[torch.Tensor]] = {}

    def start(self, module: Any, trainer: Any) -> None:
        self.probe, self.frechet, self.scores = None, None, {}
        if trainer is None or trainer.datamodule is None or trainer.fast_dev_run:
            return
        device = getattr(module, "device", "cpu")
        self.probe = probe_from_datamodule(trainer.datamodule, self.config, self.cache_dir, device)
        self.frechet = FrechetWithFloor(self.probe.num_features)
        batch_size = int(getattr(trainer.datamodule, "batch_size", 8) or 8)
        wanted = min(self.floor_clips, available_clips(trainer.datamodule) or self.floor_clips)
        seen = 0
        for batch in train_batches(trainer.datamodule, 2 * math.ceil(wanted / batch_size) + 2, seed=1):
            if batch["video"].shape[2] < 3:
                continue
            self.frechet.add_reference(self._features(batch["video"], batch.get("fps")))
            seen += batch["video"].shape[0]
            if seen >= wanted:
                break

    @torch.no_grad()
    def _features(self, video: torch.Tensor, fps: Any) -> torch.Tensor:
        return self.probe(video.float().clamp(-1, 1), fps).cpu()

    @torch.no_grad()
    def _score(self, video: torch.Tensor, metas: Sequence[dict], kind: str, fps: Any) -> torch.Tensor:
        out = self.probe.outputs(extract(video.float().clamp(-1, 1), fps=fps))
        targets = attribute_targets(metas)
        for a, hits in topk_alignment(out["scores"], targets).items():
            self.scores.setdefault(f"{kind}_{a}", []).append(hits.cpu()[targets[a].sum(1) > 0])
        return out["features"].cpu()

    def update(self, generated: torch.Tensor, batch: dict[str, Any], extras: dict[str, torch.Tensor]) -> None:
        """Generated clips for the batch's captions, scored against the scenes' ground truth; the batch's real
        clips are scored too (the ceiling)."""
        if self.probe is None or generated.shape[2] < 3 or "video" not in batch or "meta" not in batch:
            return
        n = generated.shape[0]
        metas = list(batch["meta"])[:n]
        fps = batch.get("fps")
        fps = self.probe.fps.item() if fps is None else torch.as_tensor(fps).flatten()[:n] if torch.as_tensor(fps).dim() else fps
        self.frechet.add_samples(self._score(generated, metas, "fake", fps))
        self.frechet.add_real(self._score(batch["video"][:n], metas, "real", fps))

    def compute(self) -> dict[str, float]:
        if self.probe is None:
            return {}
        out: dict[str, float] = {}
        for kind, prefix in (("fake", "alignment"), ("real", "alignment_real")):
            values = []
            for a in ATTRIBUTES:
                scores = torch.cat(self.scores.get(f"{kind}_{a}", [torch.zeros(0)]))
                if scores.numel():
                    out[f"{prefix}_{a}"] = float(scores.mean())
                    values.append(out[f"{prefix}_{a}"])
            if values:
                out[prefix] = sum(values) / len(values)
        out.update(self.frechet.compute())
        return out
