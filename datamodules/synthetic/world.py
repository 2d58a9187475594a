"""The shapes world: scene descriptions, physics and rendering (numpy, deterministic from a seed).

A scene is `SceneSpec`: a canvas (height x width, fps, num_frames), a background (plain colour, two-colour
linear gradient, or a window on one of scikit-learn's two bundled photos, optionally panning) and objects
(`ObjectSpec`: shape, colour, texture, radius, motion). `simulate` integrates the motions with time step
dt = 1 / fps:

  bounce:  p <- p + v dt, reflected at the walls (|v| kept)                       -> "bounce" events
  fall:    v_y <- v_y + g dt, p <- p + v dt; floor restitution e = 0.85, walls   -> "bounce" events
  orbit:   p(t) = c + rho (cos(theta0 + omega t), sin(theta0 + omega t))          (no events)
  still:   p constant (may spin)
  loop:    sticker motions with period = clip length, so frame T would equal frame 0 (bob, sway, pulse,
           spin, circle)

and, when `collisions` is on, exchanges the normal velocity components of two touching dynamic objects
(equal masses, elastic) -> a "collision" event. An event at frame k means the reflection happened in the
update that produced frame k (time k / fps).

`render` draws objects in id order (later ids on top) with hard edges and returns uint8 frames
[T, H, W, 3] and a uint8 label map [T, H, W] (0 = background, i = visible pixels of object id i), so the
label map is exact ground truth for the pixels.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from functools import cache, lru_cache

import numpy as np
import torch
import torch.nn.functional as F

# Bright object colours (kept apart from the background palette so objects never vanish).
OBJECT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "cyan": (40, 200, 215),
    "pink": (240, 120, 180),
}
# Secondary texture colours (stripes, checks, dots).
TEXTURE_COLOURS: dict[str, tuple[int, int, int]] = {"white": (250, 250, 250), "black": (20, 20, 20)}
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "white": (236, 236, 236),
    "grey": (128, 128, 128),
    "dark grey": (60, 60, 60),
    "beige": (225, 210, 175),
    "navy": (25, 35, 80),
    "teal": (25, 95, 95),
    "lavender": (200, 190, 230),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star")
TEXTURES = ("solid", "stripes", "checker", "dots")
MOTIONS = ("still", "bounce", "fall", "orbit")
LOOP_MOTIONS = ("bob", "sway", "pulse", "spin", "circle")
PHOTOS = ("china", "flower")  # sklearn.datasets.load_sample_images, in this order
GRAVITY = 2.5  # canvas heights per second squared
RESTITUTION = 0.85


@dataclass
class ObjectSpec:
    """One object. Positions/radii in pixels, velocities in pixels per second, angles in degrees."""

    id: int
    shape: str
    colour: str
    texture: str = "solid"
    colour2: str = "white"
    radius: float = 8.0
    motion: str = "still"
    position: tuple[float, float] = (0.0, 0.0)
    velocity: tuple[float, float] = (0.0, 0.0)
    angle: float = 0.0
    spin: float = 0.0
    orbit_centre: tuple[float, float] = (0.0, 0.0)
    orbit_radius: float = 0.0
    orbit_speed: float = 0.0  # radians per second
    loop: str = ""  # sticker loop motion (LOOP_MOTIONS) when motion == "loop"
    amplitude: float = 0.0  # loop amplitude (pixels, degrees or relative scale)
    identity: int | None = None  # identity objects wear the identity's patchwork texture
    patchwork: list[list[str]] = field(default_factory=list)  # colour names of the identity texture grid

    @property
    def rgb(self) -> tuple[int, int, int]:
        return OBJECT_COLOURS[self.colour]


@dataclass
class Background:
    """plain: colours[0]; gradient: colours[0] -> colours[1] along `angle`; photo: a window that pans."""

    kind: str
    colours: list[str] = field(default_factory=list)
    angle: float = 0.0
    photo: str = ""
    zoom: float = 1.3  # photo scaled so that its height is zoom x canvas height
    origin: tuple[float, float] = (0.0, 0.0)  # top-left of the window in the zoomed photo at t = 0 (y, x)
    pan: tuple[float, float] = (0.0, 0.0)  # window velocity (pixels per second), (y, x)


@dataclass
class SceneSpec:
    """A clip of the world: canvas, timing, background, objects and whether objects collide."""

    height: int
    width: int
    fps: float
    num_frames: int
    background: Background
    objects: list[ObjectSpec]
    collisions: bool = True

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SceneSpec:
        """The scene of `to_dict`'s output, or of a world clip's json (whose objects also hold per-frame tracks,
        left out here)."""
        known = {f.name for f in fields(ObjectSpec)}
        objects = [ObjectSpec(**{k: v for k, v in o.items() if k in known}) for o in data["objects"]]
        return cls(data["height"], data["width"], data["fps"], data["num_frames"], Background(**data["background"]),
                   objects, collisions=data.get("collisions", True))


@dataclass
class Trajectory:
    """Simulated state per frame: positions [N, T, 2] (x, y), angles [N, T] (deg), scales [N, T], events."""

    positions: np.ndarray
    angles: np.ndarray
    scales: np.ndarray
    events: list[dict]


# ----------------------------------------------------------------------------------------------------------------
# physics


def _bounce_walls(p: np.ndarray, v: np.ndarray, r: float, width: int, height: int, floor_e: float) -> list[str]:
    """Reflect position/velocity at the canvas walls in place; floor_e scales |v_y| at the floor.

    Returns the walls hit ("left", "right", "top", "floor").
    """
    hits = []
    for axis, limit, low, high in ((0, width, "left", "right"), (1, height, "top", "floor")):
        if p[axis] - r < 0:
            p[axis] = 2 * r - p[axis]
            v[axis] = abs(v[axis])
            hits.append(low)
        elif p[axis] + r > limit:
            p[axis] = 2 * (limit - r) - p[axis]
            v[axis] = -abs(v[axis]) * (floor_e if axis == 1 else 1.0)
            hits.append(high)
    return hits


def simulate(scene: SceneSpec) -> Trajectory:
    """Integrate every object's motion over the clip and record bounce/collision events (see module doc)."""
    n, frames, dt = len(scene.objects), scene.num_frames, 1.0 / scene.fps
    positions = np.zeros((n, frames, 2))
    angles = np.zeros((n, frames))
    scales = np.ones((n, frames))
    events: list[dict] = []
    p = np.array([o.position for o in scene.objects], dtype=np.float64).reshape(n, 2)
    v = np.array([o.velocity for o in scene.objects], dtype=np.float64).reshape(n, 2)
    gravity = GRAVITY * scene.height
    rest_speed = 0.2 * scene.height  # a floor bounce slower than this (pixels/s) ends in rest
    dynamic = [o.motion in ("bounce", "fall") for o in scene.objects]
    for k in range(frames):
        t = k * dt
        hits: dict[int, str] = {}
        if k > 0:
            for i, obj in enumerate(scene.objects):
                if obj.motion == "fall":
                    v[i, 1] += gravity * dt
                if dynamic[i]:
                    p[i] += v[i] * dt
                    falling = obj.motion == "fall"
                    walls = _bounce_walls(p[i], v[i], obj.radius, scene.width, scene.height,
                                          RESTITUTION if falling else 1.0)
                    if falling and "floor" in walls and abs(v[i, 1]) < rest_speed:
                        v[i, 1], p[i, 1] = 0.0, scene.height - obj.radius  # comes to rest: no more events
                        walls.remove("floor")
                    if walls:
                        hits[i] = "bounce"
            if scene.collisions:
                for i in range(n):
                    for j in range(i + 1, n):
                        if not (dynamic[i] and dynamic[j]):
                            continue
                        delta = p[j] - p[i]
                        dist = float(np.hypot(*delta))
                        reach = scene.objects[i].radius + scene.objects[j].radius
                        if 0 < dist < reach and float(np.dot(v[j] - v[i], delta)) < 0:
                            normal = delta / dist
                            exchange = float(np.dot(v[i] - v[j], normal)) * normal
                            v[i] -= exchange
                            v[j] += exchange
                            push = 0.5 * (reach - dist) * normal
                            p[i] -= push
                            p[j] += push
                            hits[i] = hits[j] = "collision"
                            events.append({"frame": k, "time": k * dt, "kind": "collision",
                                           "objects": [scene.objects[i].id, scene.objects[j].id]})
            for i, kind in hits.items():
                if kind == "bounce":
                    events.append({"frame": k, "time": k * dt, "kind": "bounce", "objects": [scene.objects[i].id]})
        for i, obj in enumerate(scene.objects):
            angle, scale = obj.angle + obj.spin * t, 1.0
            if obj.motion == "orbit":
                theta = obj.orbit_speed * t + math.atan2(obj.position[1] - obj.orbit_centre[1],
                                                         obj.position[0] - obj.orbit_centre[0])
                p[i] = np.array(obj.orbit_centre) + obj.orbit_radius * np.array([math.cos(theta), math.sin(theta)])
            elif obj.motion == "loop":
                phase = 2 * math.pi * k / frames
                x, y = obj.position
                if obj.loop == "bob":
                    y += obj.amplitude * math.sin(phase)
                elif obj.loop == "circle":
                    x += obj.amplitude * math.cos(phase) - obj.amplitude
                    y += obj.amplitude * math.sin(phase)
                elif obj.loop == "sway":
                    angle = obj.angle + obj.amplitude * math.sin(phase)
                elif obj.loop == "pulse":
                    scale = 1.0 + obj.amplitude * math.sin(phase)
                elif obj.loop == "spin":
                    angle = obj.angle + 360.0 * k / frames
                p[i] = (x, y)
            positions[i, k] = p[i]
            angles[i, k] = angle
            scales[i, k] = scale
    events.sort(key=lambda e: (e["frame"], e["objects"]))
    return Trajectory(positions, angles, scales, events)


# ----------------------------------------------------------------------------------------------------------------
# shapes and textures


@cache
def shape_vertices(shape: str) -> np.ndarray | None:
    """Polygon vertices (unit circumradius, y down) of a shape; None for the circle."""
    if shape == "circle":
        return None
    if shape == "square":
        a = 1 / math.sqrt(2)
        return np.array([[-a, -a], [a, -a], [a, a], [-a, a]])
    if shape == "diamond":
        return np.array([[0, -1], [1, 0], [0, 1], [-1, 0]], dtype=np.float64)
    if shape == "triangle":
        return np.array([[math.cos(a), math.sin(a)] for a in np.radians([-90, 30, 150])])
    if shape == "star":
        radii = [1.0 if i % 2 == 0 else 0.45 for i in range(10)]
        return np.array([[r * math.cos(a), r * math.sin(a)]
                         for r, a in zip(radii, np.radians(np.arange(10) * 36 - 90))])
    raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of local coordinates (u, v) (unit circumradius) inside the shape (even-odd rule)."""
    vertices = shape_vertices(shape)
    if vertices is None:
        return u * u + v * v <= 1.0
    inside = np.zeros(u.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(vertices, np.roll(vertices, -1, axis=0)):
        crosses = (y0 > v) != (y1 > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x0 + (v - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (u < x_at)
    return inside


def _texture(obj: ObjectSpec, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Colours [..., 3] of local points (u, v) for the object's texture (moves and turns with the object)."""
    c1 = np.array(obj.rgb, dtype=np.uint8)
    c2 = np.array(TEXTURE_COLOURS.get(obj.colour2, OBJECT_COLOURS.get(obj.colour2, (250, 250, 250))), np.uint8)
    if obj.patchwork:
        grid = np.array([[OBJECT_COLOURS[c] for c in row] for row in obj.patchwork], dtype=np.uint8)
        g = grid.shape[0]
        rows = np.clip(((v + 1) / 2 * g).astype(int), 0, g - 1)
        cols = np.clip(((u + 1) / 2 * g).astype(int), 0, g - 1)
        return grid[rows, cols]
    if obj.texture == "solid":
        second = np.zeros(u.shape, dtype=bool)
    elif obj.texture == "stripes":
        second = np.floor((u + v) * 2.5).astype(int) % 2 == 1
    elif obj.texture == "checker":
        second = (np.floor(u * 2.5).astype(int) + np.floor(v * 2.5).astype(int)) % 2 == 1
    elif obj.texture == "dots":
        fu, fv = (u * 2.5) % 1.0 - 0.5, (v * 2.5) % 1.0 - 0.5
        second = fu * fu + fv * fv < 0.08
    else:
        raise ValueError(f"unknown texture {obj.texture!r}; choose from {TEXTURES}")
    return np.where(second[..., None], c2, c1)


# ----------------------------------------------------------------------------------------------------------------
# backgrounds


@cache
def _photo_source(name: str) -> np.ndarray:
    """A bundled photo, uint8 [427, 640, 3]: china.jpg or flower.jpg from scikit-learn."""
    from sklearn.datasets import load_sample_images

    return load_sample_images().images[PHOTOS.index(name)]


@lru_cache(maxsize=256)
def _photo(name: str, height: int) -> np.ndarray:
    """A bundled photo resized to `height` rows, uint8 [h, w, 3]."""
    image = _photo_source(name)
    scale = height / image.shape[0]
    size = (height, max(1, int(round(image.shape[1] * scale))))
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float()
    resized = F.interpolate(tensor, size=size, mode="bilinear", antialias=True, align_corners=False)
    return resized[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def photo_window_limits(background: Background, height: int, width: int) -> tuple[int, int]:
    """(max_top, max_left) of the photo window for a canvas of height x width."""
    photo = _photo(background.photo, int(round(height * background.zoom)))
    return photo.shape[0] - height, photo.shape[1] - width


def render_background(background: Background, height: int, width: int, num_frames: int, fps: float) -> np.ndarray:
    """Background frames uint8 [T, H, W, 3]."""
    if background.kind == "plain":
        colour = np.array(BACKGROUND_COLOURS[background.colours[0]], dtype=np.uint8)
        return np.broadcast_to(colour, (num_frames, height, width, 3)).copy()
    if background.kind == "gradient":
        a, b = (np.array(BACKGROUND_COLOURS[c], dtype=np.float64) for c in background.colours[:2])
        ys, xs = np.mgrid[0:height, 0:width] + 0.5
        theta = math.radians(background.angle)
        proj = xs * math.cos(theta) + ys * math.sin(theta)
        w = (proj - proj.min()) / max(proj.max() - proj.min(), 1e-9)
        frame = np.round(a + (b - a) * w[..., None]).astype(np.uint8)
        return np.broadcast_to(frame, (num_frames, height, width, 3)).copy()
    if background.kind == "photo":
        photo = _photo(background.photo, int(round(height * background.zoom)))
        max_top, max_left = photo.shape[0] - height, photo.shape[1] - width
        out = np.empty((num_frames, height, width, 3), dtype=np.uint8)
        for k in range(num_frames):
            t = k / fps
            top = int(round(np.clip(background.origin[0] + background.pan[0] * t, 0, max_top)))
            left = int(round(np.clip(background.origin[1] + background.pan[1] * t, 0, max_left)))
            out[k] = photo[top : top + height, left : left + width]
        return out
    raise ValueError(f"unknown background kind {background.kind!r}")


# ----------------------------------------------------------------------------------------------------------------
# rendering


def render(scene: SceneSpec, trajectory: Trajectory) -> tuple[np.ndarray, np.ndarray]:
    """Draw the scene: uint8 frames [T, H, W, 3] and uint8 visible-object labels [T, H, W] (0 = background)."""
    h, w, frames = scene.height, scene.width, scene.num_frames
    video = render_background(scene.background, h, w, frames, scene.fps)
    labels = np.zeros((frames, h, w), dtype=np.uint8)
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    for i, obj in enumerate(scene.objects):
        for k in range(frames):
            radius = obj.radius * trajectory.scales[i, k]
            cx, cy = trajectory.positions[i, k]
            x0, x1 = max(0, int(cx - radius - 1)), min(w, int(cx + radius + 2))
            y0, y1 = max(0, int(cy - radius - 1)), min(h, int(cy + radius + 2))
            if x0 >= x1 or y0 >= y1:
                continue
            theta = math.radians(trajectory.angles[i, k])
            dx, dy = (xs[y0:y1, x0:x1] - cx) / radius, (ys[y0:y1, x0:x1] - cy) / radius
            u = dx * math.cos(theta) + dy * math.sin(theta)  # rotate by -theta into the object frame
            v = -dx * math.sin(theta) + dy * math.cos(theta)
            mask = _inside(obj.shape, u, v)
            if not mask.any():
                continue
            colours = _texture(obj, u, v)
            video[k, y0:y1, x0:x1][mask] = colours[mask]
            labels[k, y0:y1, x0:x1][mask] = obj.id
    return video, labels


def motion_score(frames: np.ndarray) -> float:
    """Mean absolute frame difference, mean |x_t - x_{t-1}| / 255 over t, pixels and channels (0 for stills)."""
    if len(frames) < 2:
        return 0.0
    return float(np.abs(np.diff(frames.astype(np.int16), axis=0)).mean() / 255.0)


#: Upper edges of the motion buckets (Animated Stickers' "motion bucketing"): bucket b holds scores in
#: [edge_{b-1}, edge_b); each edge doubles the last, so the 8 buckets cover still (0) to fast (7). On the world's
#: stickers the quartiles of motion_score are 0.010, 0.021, 0.030: buckets 2-4 hold half of them.
MOTION_BUCKET_EDGES = (0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16)


def motion_bucket(score: float, edges: tuple[float, ...] = MOTION_BUCKET_EDGES) -> int:
    """The bucket of a motion score: the number of edges <= score (0 .. len(edges))."""
    return int(np.searchsorted(np.asarray(edges), score, side="right"))
