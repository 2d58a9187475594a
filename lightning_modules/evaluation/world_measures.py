"""Measures of clips of the shapes world that need no probe: the prompt's object is segmented per frame from the
world's known colours (`palette.object_masks`, soft: antialiased edges count by their share), and its masks,
centroid track and background are scored.

Notation: a clip of T frames, H x W pixels, `side` = min(H, W) pixels, frame rate f. For one object,
M_t ∈ [0, 1]^{H×W} its mask in frame t, a_t = Σ M_t its area, c_t = Σ p·M_t(p) / a_t its centroid (pixels),
v_t = c_{t+1} − c_t its moves, and S_d(M) the mask M moved by d pixels (bilinear, zeros enter).
IoU(A, B) = Σ min(A, B) / Σ max(A, B) (the Jaccard index of soft masks; plain IoU for binary ones).

Temporal consistency (shape and size kept from frame to frame; higher IoU, lower CV is better):
    consistency_iou  = mean_t IoU(M_{t+1}, S_{v_t}(M_t))               outline after aligning the centroids
    coherence_iou    = mean_{t≥1} IoU(M_{t+1}, S_{v_{t−1}}(M_t))        the next mask predicted by the last move
                                                                        (constant velocity): order-sensitive
    area_cv          = std_t(a_t) / mean_t(a_t)                          coefficient of variation of the area
Motion (agreement with the prompt's motion):
    direction_cosine = mean_t cos∠(v_t, v_{t+1}) over pairs of moves longer than `min_step`·side per second
                       (moving objects; ~+0.7 on real bouncing clips, ~0 on shuffled frames)
    still_speed      = mean_t ‖v_t‖ · f / side    (still objects; ~0 on real clips)
    motion_accuracy  = [classify_motion(c) = the prompt's motion]   (see `classify_motion`)
Background (pixels of no object in any frame, shrunk by one pixel away from the objects):
    background_flicker = mean_p std_t x_t(p)                  temporal std, pixels in [0, 1], mean over channels
    background_speckle = mean_{p,t} |Δx_t(p)|                  Δ = the 4-neighbour Laplacian, only where the whole
                                                               3x3 window is background: ~0 on plain and linear
                                                               gradients, high for speckle noise
Colours (every pixel, objects' edges included, where speckle does not look):
    off_palette        = mean_{p,t} [d_blend(x_t(p)) > OFF_PALETTE]   the share of pixels that are no blend of an
                                                               object's colour with the background's (`palette`:
                                                               ghosts and fringes a viewer sees; ~0 on real clips)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from datamodules.synthetic.world import GRAVITY, MOTIONS
from lightning_modules.evaluation.base import Evaluator
from lightning_modules.evaluation.palette import blend_distance, dilate, object_masks, unit

# Thresholds of the motion classifier, in the world's units (canvas side = min(H, W), seconds); see classify_motion.
STILL_SPEED = 0.15  # side / s; the world's moving objects go 0.2 - 1.0 side / s
ORBIT_SPEEDS = (1.0, 4.0)  # rad / s searched by the circle fit; the world's orbits turn 1.5 - 3 rad / s
ORBIT_RESIDUAL = 0.2  # circle-fit RMS residual / RMS spread of the track below which a track may be an orbit
SHARP_REVERSAL = 1.1  # (|step before| + |step after|) / largest step, at a reversal of one axis: a wall bounce
FALL_GRAVITY = 0.6  # fitted vertical acceleration / the world's gravity above which a track may be a fall …
FALL_SPEED_CV = 0.12  # … if its speed also varies by this much (a bounce keeps |v|: ~0.05 on real clips) …
FALL_SPEED_CV_ALONE = 0.25  # … or is a fall by its varying speed alone (real falls: 0.25 - 0.55)
MIN_STEP = 0.16  # side / s: moves shorter than this have no direction (direction_cosine ignores them)
OFF_PALETTE = 0.1  # RGB distance in [0, 1] from every blend of the clip's colours (~25 of 255 levels on a channel)


# ---------------------------------------------------------------------------------------------------------------
# masks and tracks


def centroids(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c [..., T, 2], a [..., T]): c_t = Σ p·M_t(p) / a_t in pixels (x, y) with pixel centres at i + 0.5,
    a_t = Σ_p M_t(p); c_t is NaN where a_t = 0."""
    m = masks.float()
    height, width = m.shape[-2:]
    area = m.sum((-2, -1))
    xs = torch.arange(width, dtype=m.dtype, device=m.device) + 0.5
    ys = torch.arange(height, dtype=m.dtype, device=m.device) + 0.5
    cx = (m.sum(-2) * xs).sum(-1) / area
    cy = (m.sum(-1) * ys).sum(-1) / area
    centre = torch.stack([cx, cy], dim=-1)
    return torch.where(area[..., None] > 0, centre, torch.full_like(centre, float("nan"))), area


def shift(masks: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """S_d(M): masks [N, H, W] moved by offsets [N, 2] (dx, dy) pixels, bilinear, zeros shifted in."""
    m = masks.float()[:, None]
    n, _, height, width = m.shape
    theta = torch.zeros(n, 2, 3, dtype=m.dtype, device=m.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    # grid_sample reads the source at output position − d; normalised coordinates span 2 over W (H) pixels
    theta[:, 0, 2] = -2.0 * offsets[:, 0].to(m) / width
    theta[:, 1, 2] = -2.0 * offsets[:, 1].to(m) / height
    grid = F.affine_grid(theta, list(m.shape), align_corners=False)
    return F.grid_sample(m, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]


def soft_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU(A, B) = Σ min(A, B) / Σ max(A, B) over the last two dims (NaN where both are empty)."""
    a, b = a.float(), b.float()
    union = torch.maximum(a, b).sum((-2, -1))
    return torch.minimum(a, b).sum((-2, -1)) / union.where(union > 0, torch.full_like(union, float("nan")))


def _nanmean(x: torch.Tensor) -> float:
    x = x[~torch.isnan(x)]
    return float(x.mean()) if x.numel() else float("nan")


def consistency_iou(masks: torch.Tensor) -> float:
    """mean_t IoU(M_{t+1}, S_{v_t}(M_t)) for masks [T, H, W]: the outline kept once the centroids are aligned.
    A frame pair where the object is missing from one frame scores 0; from both, it is skipped."""
    if masks.shape[0] < 2:
        return float("nan")
    track, area = centroids(masks)
    moves = (track[1:] - track[:-1]).nan_to_num(0.0)
    iou = soft_iou(masks[1:], shift(masks[:-1], moves))
    lost = (area[1:] > 0) ^ (area[:-1] > 0)
    return _nanmean(torch.where(lost, torch.zeros_like(iou), iou))


def coherence_iou(masks: torch.Tensor) -> float:
    """mean_{t≥1} IoU(M_{t+1}, S_{v_{t−1}}(M_t)) for masks [T, H, W]: how well the last move predicts the next
    mask (constant velocity). Unlike `consistency_iou` it drops when frames come in the wrong order."""
    if masks.shape[0] < 3:
        return float("nan")
    track, area = centroids(masks)
    moves = (track[1:-1] - track[:-2]).nan_to_num(0.0)
    iou = soft_iou(masks[2:], shift(masks[1:-1], moves))
    lost = (area[2:] > 0) ^ (area[1:-1] > 0)
    return _nanmean(torch.where(lost, torch.zeros_like(iou), iou))


def area_cv(masks: torch.Tensor) -> float:
    """std_t(a_t) / mean_t(a_t) (population std) for masks [T, H, W]; NaN if the object is never found."""
    area = masks.float().sum((-2, -1))
    mean = area.mean()
    return float(area.std(unbiased=False) / mean) if mean > 0 else float("nan")


def fill_track(track: torch.Tensor) -> torch.Tensor:
    """A track [T, 2] with NaN frames (object not found) filled from the nearest found frame (earlier first)."""
    found = ~torch.isnan(track[:, 0])
    if found.all() or not found.any():
        return track
    index = torch.arange(len(track))
    known = index[found]
    nearest = known[(index[:, None] - known[None]).abs().argmin(1)]
    return track[nearest]


def direction_cosine(track: torch.Tensor, min_step: float = 0.0) -> float:
    """mean_t cos∠(v_t, v_{t+1}) over consecutive moves of a track [T, 2] that are both longer than `min_step`
    (same units as the track); NaN when no pair qualifies."""
    moves = track[1:] - track[:-1]
    length = moves.norm(dim=-1)
    ok = (length[:-1] > min_step) & (length[1:] > min_step)
    cos = (moves[:-1] * moves[1:]).sum(-1) / (length[:-1] * length[1:]).clamp_min(1e-12)
    return _nanmean(cos[ok]) if ok.any() else float("nan")


# ---------------------------------------------------------------------------------------------------------------
# the motion classifier


def circle_fit(track: torch.Tensor, omegas: Sequence[float]) -> tuple[float, float, float]:
    """Least-squares circle at constant angular speed: z_t = o + ρ e^{i(θ₀ + ωt)}, z_t = x_t + i y_t, linear in
    (o, w = ρe^{iθ₀}) for each ω in ±`omegas` (rad per frame). With e_t = e^{iωt}, n = T, S = Σ e_t and
    r = (Σ z_t, Σ ē_t z_t), the normal equations [[n, S], [S̄, n]] (o, w) = r give the residual
    Σ|z_t|² − rᴴ [[n, S], [S̄, n]]⁻¹ r. Returns (RMS residual, ω, ρ) of the best ω."""
    t = torch.arange(len(track), dtype=torch.float64)
    z = torch.complex(track[:, 0].double(), track[:, 1].double())
    w = torch.tensor(list(omegas), dtype=torch.float64)
    w = torch.cat([w, -w])
    e = torch.exp(1j * w[:, None] * t[None])  # [Ω, T]
    n = float(len(track))
    s = e.sum(1)
    r0, r1 = z.sum().expand_as(s), (e.conj() * z).sum(1)
    det = (n * n - s.abs().pow(2)).clamp_min(1e-9)
    o = (n * r0 - s * r1) / det  # the inverse of [[n, S], [S̄, n]] applied to r
    amp = (n * r1 - s.conj() * r0) / det
    explained = (r0.conj() * o + r1.conj() * amp).real
    residual = ((z.abs().pow(2).sum() - explained).clamp_min(0) / n).sqrt()
    best = int(residual.argmin())
    return float(residual[best]), float(w[best]), float(amp[best].abs())


def line_residual(track: torch.Tensor) -> float:
    """RMS residual of the least-squares constant-velocity fit c_t = c₀ + v·t of a track [T, 2]."""
    t = np.arange(len(track), dtype=np.float64)
    basis = np.stack([np.ones_like(t), t], axis=1)
    points = track.double().numpy()
    solution = np.linalg.lstsq(basis, points, rcond=None)[0]
    return float(np.sqrt(((basis @ solution - points) ** 2).sum(1).mean()))


def reversal_sharpness(track: torch.Tensor, min_step: float) -> float:
    """max over the axes whose largest step exceeds `min_step`, and over their reversals (the step changes sign),
    of (|step before| + |step after|) / largest step. A wall bounce reverses a full-speed step at once (≳ 1); an
    orbit turns round smoothly (≈ ω per frame ≪ 1); 0 without reversals."""
    steps = track[1:] - track[:-1]
    best = 0.0
    for axis in range(steps.shape[1]):
        s = steps[:, axis]
        largest = float(s.abs().max()) if len(s) else 0.0
        if largest <= min_step:
            continue
        flips = (s[:-1] * s[1:]) < 0
        if flips.any():
            best = max(best, float(((s[:-1].abs() + s[1:].abs())[flips]).max()) / largest)
    return best


def gravity_fit(y: torch.Tensor) -> float:
    """Vertical acceleration (track units per frame²) of the least-squares fit y_t = a_s + b_s·t + ½g·t², with
    one (a_s, b_s) per segment between reversals of y (a floor or wall bounce) and one g; the frame at each
    reversal is left out (the bounce happened on one side of it), and so are segments of one frame (they say
    nothing of g). 0 when no segment has 3 frames (g is not determined)."""
    steps = y[1:] - y[:-1]
    turns = {t + 1 for t in range(len(steps) - 1) if float(steps[t] * steps[t + 1]) < 0}
    segments: list[list[int]] = [[]]
    for t in range(len(y)):
        if t in turns:
            segments.append([])
        else:
            segments[-1].append(t)
    segments = [s for s in segments if len(s) >= 2]
    if not any(len(s) >= 3 for s in segments):
        return 0.0
    rows = [t for s in segments for t in s]
    basis = np.zeros((len(rows), 2 * len(segments) + 1))
    row = 0
    for k, segment in enumerate(segments):
        for t in segment:
            basis[row, 2 * k], basis[row, 2 * k + 1], basis[row, -1] = 1.0, t, 0.5 * t * t
            row += 1
    # numpy's SVD-based solver: full rank here, and the same answer for the same track on every call
    solution = np.linalg.lstsq(basis, y.double().numpy()[rows], rcond=None)[0]
    return float(solution[-1])


def track_features(track: torch.Tensor, height: int, width: int, fps: float) -> dict[str, float]:
    """The features `motion_rule` reads from a centroid track [T, 2] (pixels), in the world's units:
    speed (side / s), orbit (circle RMS residual / RMS spread), line (constant-velocity RMS residual / circle
    residual), sharpness (`reversal_sharpness`), gravity (fitted g / the world's gravity), cosine
    (`direction_cosine`, 0 when undefined), speed_cv (median_t |s_t − s̃| / s̃ with s_t = ‖v_t‖, s̃ = median_t s_t:
    a bounce or an orbit keeps its speed, a fall gains g/f per frame)."""
    side = float(min(height, width))
    track = fill_track(track.double()) / side
    if torch.isnan(track).any() or len(track) < 3:
        return {"speed": 0.0, "orbit": 1.0, "line": 1.0, "sharpness": 0.0, "gravity": 0.0, "cosine": 0.0,
                "speed_cv": 0.0}
    per_frame = 1.0 / fps
    steps = (track[1:] - track[:-1]).norm(dim=-1)
    speed = float(steps.mean()) * fps
    typical = steps.median()
    speed_cv = float((steps - typical).abs().median() / typical) if typical > 0 else 0.0
    omegas = torch.linspace(ORBIT_SPEEDS[0] * per_frame, ORBIT_SPEEDS[1] * per_frame, 16).tolist()
    residual, _, _ = circle_fit(track, omegas)
    spread = float((track - track.mean(0)).norm(dim=1).pow(2).mean().sqrt())
    world_gravity = GRAVITY * height / side * per_frame**2  # sides per frame²
    cosine = direction_cosine(track, MIN_STEP * per_frame)
    return {
        "speed": speed,
        "orbit": residual / max(spread, 1e-9),
        "line": line_residual(track) / max(residual, 1e-9),
        "sharpness": reversal_sharpness(track, MIN_STEP * per_frame),
        "gravity": gravity_fit(track[:, 1]) / world_gravity,
        "cosine": 0.0 if math.isnan(cosine) else cosine,
        "speed_cv": speed_cv,
    }


def motion_rule(features: dict[str, float]) -> str:
    """The motion whose characteristic track `track_features` describe:

        still   if speed < STILL_SPEED
        orbit   if line > 1.5 (a straight line fits clearly worse than a circle at 1-4 rad/s) and either
                orbit < ORBIT_RESIDUAL / 2 (the circle fits closely) or orbit < ORBIT_RESIDUAL and sharpness <
                SHARP_REVERSAL (it fits and no axis reverses like a wall bounce)
        fall    if gravity > FALL_GRAVITY and speed_cv > FALL_SPEED_CV (the vertical acceleration between
                bounces is the world's gravity, and the speed changes), or speed_cv > FALL_SPEED_CV_ALONE
        bounce  otherwise (constant-speed straight moves reflected at the walls)
    """
    if features["speed"] < STILL_SPEED:
        return "still"
    if features["line"] > 1.5 and (features["orbit"] < ORBIT_RESIDUAL / 2
                                   or (features["orbit"] < ORBIT_RESIDUAL and features["sharpness"] < SHARP_REVERSAL)):
        return "orbit"
    if ((features["gravity"] > FALL_GRAVITY and features["speed_cv"] > FALL_SPEED_CV)
            or features["speed_cv"] > FALL_SPEED_CV_ALONE):
        return "fall"
    return "bounce"


def classify_motion(track: torch.Tensor, height: int, width: int, fps: float) -> str:
    """The world's motion (still, bounce, fall, orbit) whose characteristic track this centroid track [T, 2]
    (pixels, NaN where the object was not found) has: `motion_rule` of its `track_features`; "none" when the
    object is found in fewer than 2 frames."""
    if int((~torch.isnan(track[:, 0])).sum()) < 2:
        return "none"
    return motion_rule(track_features(track, height, width, fps))


# ---------------------------------------------------------------------------------------------------------------
# background


def background_region(masks: torch.Tensor) -> torch.Tensor:
    """Bool [H, W]: pixels that no object mask [N, T, H, W] covers in any frame, dilated objects by one pixel
    (antialiased edges excluded)."""
    covered = masks.reshape(-1, *masks.shape[-2:]).any(0)
    return ~dilate(covered, 3)


def background_flicker(video: torch.Tensor, region: torch.Tensor) -> float:
    """mean_p std_t x_t(p) over background pixels p of a clip [3, T, H, W] in [-1, 1] (x in [0, 1]); NaN if
    the region is empty."""
    if not region.any() or video.shape[1] < 2:
        return float("nan")
    x = unit(video)
    return float(x.std(dim=1, unbiased=False).mean(0)[region].mean())


def background_speckle(video: torch.Tensor, region: torch.Tensor) -> float:
    """mean |Δx_t(p)| (4-neighbour Laplacian, per channel, x in [0, 1]) over frames and background pixels p whose
    3x3 window is background; NaN if there are none."""
    x = unit(video).permute(1, 0, 2, 3)  # [T, 3, H, W]
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], dtype=x.dtype)
    laplacian = F.conv2d(x.reshape(-1, 1, *x.shape[-2:]), kernel[None, None]).reshape(*x.shape[:2],
                                                                                    *(s - 2 for s in x.shape[-2:]))
    r = region.float()[None, None]
    inner = -F.max_pool2d(-F.pad(r, (1, 1, 1, 1), value=0.0), 3, stride=1)  # all 3x3 neighbours background
    inner = inner[0, 0, 1:-1, 1:-1] > 0.5
    if not inner.any():
        return float("nan")
    return float(laplacian.abs().mean(1)[:, inner].mean())


def off_palette(video: torch.Tensor, meta: dict[str, Any]) -> float:
    """The share of the pixels of a clip [3, T, H, W] in [-1, 1] farther than OFF_PALETTE from every blend of an
    object's colour with the background's (`palette.blend_distance`); NaN where the scene has no colour model."""
    distance = blend_distance(unit(video), meta)
    return float("nan") if distance is None else float((distance > OFF_PALETTE).float().mean())


# ---------------------------------------------------------------------------------------------------------------
# all measures of one clip, and the evaluator


def clip_measures(video: torch.Tensor, meta: dict[str, Any], fps: float) -> dict[str, list[float]]:
    """Every measure of one clip [3, T, H, W] in [-1, 1] for its scene record `meta` (the prompt's ground truth):
    name → values (one per object for the object measures, one for the clip for the background ones; NaN where
    undefined, e.g. direction_cosine of a still object)."""
    _, _, height, width = video.shape
    masks = object_masks(video, meta, soft=True)
    out: dict[str, list[float]] = {k: [] for k in ("consistency_iou", "coherence_iou", "area_cv", "direction_cosine",
                                                   "still_speed", "motion_accuracy")}
    side = float(min(height, width))
    for obj, mask in zip(meta["objects"], masks):
        out["consistency_iou"].append(consistency_iou(mask))
        out["coherence_iou"].append(coherence_iou(mask))
        out["area_cv"].append(area_cv(mask))
        track, _ = centroids(mask)
        moving = obj.get("motion") != "still"
        cosine = direction_cosine(fill_track(track), MIN_STEP * side / fps)
        out["direction_cosine"].append(cosine if moving else float("nan"))
        steps = (fill_track(track)[1:] - fill_track(track)[:-1]).norm(dim=-1)
        speed = float(steps.mean()) * fps / side if not moving else float("nan")
        out["still_speed"].append(speed)
        if obj.get("motion") in MOTIONS:
            out["motion_accuracy"].append(float(classify_motion(track, height, width, fps) == obj["motion"]))
    region = background_region(masks > 0.5)
    if (meta.get("background") or {}).get("kind") in ("plain", "gradient"):  # a photo may pan: not static
        out["background_flicker"] = [background_flicker(video, region)]
        out["background_speckle"] = [background_speckle(video, region)]
    out["off_palette"] = [off_palette(video, meta)]
    return out


class WorldMeasures(Evaluator):
    """The probe-free measures of the module docstring on generated clips, each beside the same measure on the
    batch's real clips (the ceiling): logs <name> and <name>_real for consistency_iou, coherence_iou, area_cv,
    direction_cosine, still_speed, motion_accuracy, background_flicker, background_speckle, off_palette. Each is
    the mean over objects (background and colour ones: over clips) where it is defined. Needs batches with the
    world's "meta"; single images are skipped. Cheap: it may run on validation (`on_validation`).
    """

    def __init__(self, on_validation: bool = False) -> None:
        self.on_validation = on_validation
        self.values: dict[str, list[float]] = {}

    def start(self, module: Any, trainer: Any) -> None:
        self.values = {}

    def add(self, video: torch.Tensor, metas: Sequence[dict[str, Any]], fps: Any, suffix: str = "") -> None:
        """Accumulate the measures of clips [B, 3, T, H, W] (fps: a number or [B]) under <name><suffix>."""
        fps_list = [float(f) for f in torch.as_tensor(fps, dtype=torch.float64).expand(video.shape[0])]
        for clip, meta, f in zip(video.detach().float().cpu(), metas, fps_list):
            for name, values in clip_measures(clip, meta, f if f > 0 else float(meta.get("fps") or 8.0)).items():
                self.values.setdefault(name + suffix, []).extend(values)

    def update(self, generated: torch.Tensor, batch: dict[str, Any], extras: dict[str, torch.Tensor]) -> None:
        if generated.shape[2] < 3 or "meta" not in batch:
            return
        metas = list(batch["meta"])[: generated.shape[0]]
        if not all((m or {}).get("objects") for m in metas):
            return
        fps = batch.get("fps", torch.tensor([float(m.get("fps") or 8.0) for m in metas]))
        fps = torch.as_tensor(fps)[: generated.shape[0]] if torch.as_tensor(fps).dim() else fps
        self.add(generated, metas, fps)
        if "video" in batch:
            self.add(batch["video"][: generated.shape[0]], metas, fps, "_real")

    def compute(self) -> dict[str, float]:
        out = {}
        for name, values in self.values.items():
            value = _nanmean(torch.tensor(values, dtype=torch.float64))
            if not math.isnan(value):
                out[name] = value
        return out
