"""Sampling the shapes world into shard samples, deterministic from (seed, kind, split, index).

Kinds (each with a train and a val split):
  scenes      clips of 1-3 objects with motions, bounces, collisions; `mp4` + `wav` (a tone per bounce) +
              `mask.npz` + `txt` + `json` (objects with per-frame positions, events, background, audio caption)
  images      still frames of the same world: `png` + `mask.npz` + `txt` + `json`
  identities  clips of one "identity" (a shape in a fixed patchwork texture, named by a caption token such as
              "zq3") over varied backgrounds and motions; several clips per identity, val = held-out clips of
              the same identities, or with `held_out_identities` clips of identities never in train; `ref.npz`
              holds its reference crops (`datamodules.references`: paired from its own frames, cross-paired
              from the other clips of its identity in the split)
  edits       pairs (source `mp4`, target `edit.mp4`) that differ by one edit: recolour, replace, add or
              remove an object; `txt` = the instruction; `mask.npz` holds source and target label maps
  stickers    one object on a plain background moving in a loop (frame T would equal frame 0); the middle
              frame T // 2 is the still sticker, stored as `sticker.png`

Every random choice comes from `np.random.default_rng([seed, kind, split, index])`, so one sample can be
regenerated alone and the world does not depend on generation order or worker count.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache

import numpy as np

from datamodules.media import encode_audio, encode_frames, encode_image
from datamodules.references import REFERENCE_SIZE, clip_references
from datamodules.synthetic import captions
from datamodules.synthetic.sound import sonify
from datamodules.synthetic.world import (
    BACKGROUND_COLOURS,
    LOOP_MOTIONS,
    OBJECT_COLOURS,
    PHOTOS,
    SHAPES,
    TEXTURES,
    Background,
    ObjectSpec,
    SceneSpec,
    Trajectory,
    motion_bucket,
    motion_score,
    photo_window_limits,
    render,
    simulate,
)

KINDS = ("scenes", "images", "identities", "edits", "stickers")
SPLITS = ("train", "val")
BACKGROUND_KINDS = ("plain", "gradient", "photo")
EDIT_KINDS = ("recolour", "replace", "add", "remove")
TEXTURE_WEIGHTS = {"solid": 0.4, "stripes": 0.2, "checker": 0.2, "dots": 0.2}  # how often each texture is drawn


@dataclass
class WorldConfig:
    """What to generate. Counts are (train, val) pairs; sizes are (height, width) pairs."""

    seed: int = 0
    sizes: list[list[int]] = field(default_factory=lambda: [[64, 64], [48, 80], [80, 48]])
    fps: list[float] = field(default_factory=lambda: [8.0, 12.0, 16.0])
    durations: list[float] = field(default_factory=lambda: [1.0, 2.0, 3.0])
    max_objects: int = 3
    radius_range: list[float] = field(default_factory=lambda: [0.1, 0.2])  # scene objects, x the shorter side
    backgrounds: list[str] = field(default_factory=lambda: list(BACKGROUND_KINDS))
    textures: list[str] = field(default_factory=lambda: list(TEXTURES))  # scene objects' textures
    upright: bool = False  # scene objects keep angle 0 and never spin (shape is then readable from the outline)
    # Scene objects start within this fraction of their free range around its middle (1: anywhere; 0: at the
    # centre). Small values make a caption's shape and motion visible in the clip's mean, not only in its detail.
    start_spread: float = 1.0
    speed_range: list[float] = field(default_factory=lambda: [0.4, 1.0])  # a bounce's speed, x shorter side a second
    sample_rate: int = 16000
    scenes: list[int] = field(default_factory=lambda: [256, 32])
    images: list[int] = field(default_factory=lambda: [256, 32])
    identities: int = 8
    clips_per_identity: list[int] = field(default_factory=lambda: [4, 1])
    held_out_identities: int = 0  # > 0: val holds this many new identities (numbered after the training ones)
    identity_radius_range: list[float] = field(default_factory=lambda: [0.18, 0.25])  # x the shorter side
    added_radius_range: list[float] = field(default_factory=lambda: [0.1, 0.2])  # an "add" edit's new object
    edits: list[int] = field(default_factory=lambda: [64, 8])
    stickers: list[int] = field(default_factory=lambda: [64, 8])
    sticker_size: int = 64
    sticker_frames: list[int] = field(default_factory=lambda: [8, 16])
    sticker_fps: float = 8.0
    crf: int = 18
    shard_size: int = 64

    def __post_init__(self) -> None:
        unknown = set(self.backgrounds) - set(BACKGROUND_KINDS)
        if unknown or not self.backgrounds:
            raise ValueError(f"world.backgrounds={self.backgrounds}: choose from {list(BACKGROUND_KINDS)}")
        if set(self.textures) - set(TEXTURES) or not self.textures:
            raise ValueError(f"world.textures={self.textures}: choose from {list(TEXTURES)}")
        if not 0 <= self.start_spread <= 1:
            raise ValueError(f"world.start_spread={self.start_spread}: need 0 <= start_spread <= 1")
        low, high = self.radius_range
        if not 0 < low <= high < 0.5:
            raise ValueError(f"world.radius_range={self.radius_range}: need 0 < low <= high < 0.5 (x the shorter side)")
        low, high = self.speed_range
        if not 0 < low <= high:
            raise ValueError(f"world.speed_range={self.speed_range}: need 0 < low <= high (x the shorter side a second)")

    def to_dict(self) -> dict:
        """The fields; those added after worlds were cached (`LATER_FIELDS`) only when set, so that the hash of
        an existing world's config, its folder name (`write_shards.world_dir`), stays the same."""
        fields = asdict(self)
        return {k: v for k, v in fields.items() if k not in LATER_FIELDS or v != LATER_FIELDS[k]}

    def count(self, kind: str, split: str) -> int:
        """Number of samples of `kind` in `split`."""
        s = SPLITS.index(split)
        if kind == "identities":
            identities = self.held_out_identities if split == "val" and self.held_out_identities else self.identities
            return identities * self.clips_per_identity[s]
        return int(getattr(self, kind)[s])

    def identity(self, split: str, index: int) -> int:
        """The identity of identity clip `index` of `split` (held-out identities follow the training ones)."""
        identity = index // self.clips_per_identity[SPLITS.index(split)]
        return identity + self.identities if split == "val" and self.held_out_identities else identity


# field -> default: fields added after worlds were cached, left out of to_dict() at their default
LATER_FIELDS = {"held_out_identities": 0, "identity_radius_range": [0.18, 0.25], "added_radius_range": [0.1, 0.2],
                "textures": list(TEXTURES), "upright": False, "start_spread": 1.0, "speed_range": [0.4, 1.0]}


def rng_for(seed: int, kind: str, split: str, index: int) -> np.random.Generator:
    """The generator of one sample: default_rng([seed, kind id, split id, index])."""
    return np.random.default_rng([seed, KINDS.index(kind) + 1, SPLITS.index(split) + 1, index])


# ----------------------------------------------------------------------------------------------------------------
# sampling scene descriptions


def _pick(rng: np.random.Generator, options, p=None):
    return options[int(rng.choice(len(options), p=p))]


def sample_background(rng: np.random.Generator, height: int, width: int, duration: float,
                      kinds: tuple[str, ...] = BACKGROUND_KINDS, pan: bool = True) -> Background:
    """A plain, gradient or (possibly panning, if `pan`) photo background."""
    kind = _pick(rng, kinds)
    names = list(BACKGROUND_COLOURS)
    if kind == "plain":
        return Background("plain", [_pick(rng, names)])
    if kind == "gradient":
        first = _pick(rng, names)
        second = _pick(rng, [n for n in names if n != first])
        return Background("gradient", [first, second], angle=float(rng.uniform(0, 360)))
    background = Background("photo", photo=_pick(rng, PHOTOS), zoom=float(rng.uniform(1.2, 1.6)))
    max_top, max_left = photo_window_limits(background, height, width)
    top, left = float(rng.uniform(0, max_top)), float(rng.uniform(0, max_left))
    if rng.random() < 0.5 and pan:
        axis = int(rng.integers(2))
        room = (max_top - top, top) if axis == 0 else (max_left - left, left)
        direction = 1 if room[0] >= room[1] else -1
        speed = direction * max(room) / duration * float(rng.uniform(0.3, 0.9))
        background.pan = (speed, 0.0) if axis == 0 else (0.0, speed)
    background.origin = (top, left)
    return background


def sample_object(
    rng: np.random.Generator,
    object_id: int,
    height: int,
    width: int,
    others: list[ObjectSpec],
    motion: str | None = None,
    radius_range: tuple[float, float] = (0.1, 0.2),
    textures: tuple[str, ...] = TEXTURES,
    upright: bool = False,
    start_spread: float = 1.0,
    speed_range: tuple[float, float] = (0.4, 1.0),
) -> ObjectSpec:
    """An object whose (shape, colour) differs from `others`, placed without overlapping them at t = 0 (tried
    100 times); its texture one of `textures` (in TEXTURE_WEIGHTS' proportions), its angle and spin 0 when
    `upright`, its start within `start_spread` of the free range around the range's middle, a bounce's speed drawn
    from `speed_range` (x the shorter side a second)."""
    taken = {(o.shape, o.colour) for o in others}
    while True:
        shape, colour = _pick(rng, SHAPES), _pick(rng, list(OBJECT_COLOURS))
        if (shape, colour) not in taken:
            break
    weights = np.array([TEXTURE_WEIGHTS[t] for t in textures])
    texture = _pick(rng, textures, p=weights / weights.sum())
    side = min(height, width)
    radius = float(rng.uniform(*radius_range) * side)
    motion = motion or _pick(rng, ("still", "bounce", "fall", "orbit"), p=[0.15, 0.45, 0.2, 0.2])
    obj = ObjectSpec(id=object_id, shape=shape, colour=colour, texture=texture,
                     colour2=_pick(rng, ["white", "black"]), radius=radius, motion=motion,
                     angle=float(rng.uniform(0, 360)),
                     spin=float(rng.uniform(-180, 180)) if rng.random() < 0.3 else 0.0)
    if upright:  # drawn all the same, so that the world's other draws do not change
        obj.angle, obj.spin = 0.0, 0.0
    for _ in range(100):
        x, y = rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)
        y_range = (radius, height - radius)
        if motion == "fall":
            y = rng.uniform(radius, max(radius, height / 2))
            y_range = (radius, max(radius, height / 2))
        if start_spread != 1.0:  # same draws, pulled towards the middle
            x = width / 2 + start_spread * (x - width / 2)
            y = sum(y_range) / 2 + start_spread * (y - sum(y_range) / 2)
        if all(math.hypot(x - o.position[0], y - o.position[1]) > radius + o.radius + 1 for o in others):
            break
    obj.position = (float(x), float(y))
    speed = float(rng.uniform(*speed_range) * side)  # drawn for every motion, so that later draws stay the same
    heading = float(rng.uniform(0, 2 * math.pi))
    if motion == "bounce":
        obj.velocity = (speed * math.cos(heading), speed * math.sin(heading))
    elif motion == "fall":
        obj.velocity = (float(rng.uniform(-0.3, 0.3) * width), 0.0)
    elif motion == "orbit":
        rho = float(rng.uniform(0.15, 0.3) * side)
        rho = max(1.0, min(rho, (width - 2 * radius) / 2 - 1, (height - 2 * radius) / 2 - 1))
        cx = float(np.clip(x, radius + rho, width - radius - rho))
        cy = float(np.clip(y, radius + rho, height - radius - rho))
        theta = float(rng.uniform(0, 2 * math.pi))
        obj.orbit_centre, obj.orbit_radius = (cx, cy), rho
        obj.position = (cx + rho * math.cos(theta), cy + rho * math.sin(theta))
        obj.orbit_speed = float(rng.choice([-1, 1]) * rng.uniform(1.5, 3.0))
    return obj


def sample_canvas(rng: np.random.Generator, config: WorldConfig) -> tuple[int, int, float, int]:
    """(height, width, fps, num_frames) from the configured sizes, frame rates and durations."""
    height, width = _pick(rng, [tuple(s) for s in config.sizes])
    fps = float(_pick(rng, list(config.fps)))
    duration = float(_pick(rng, list(config.durations)))
    return int(height), int(width), fps, max(1, int(round(duration * fps)))


def sample_scene(rng: np.random.Generator, config: WorldConfig, still: bool = False,
                 collisions: bool = True, min_objects: int = 1) -> SceneSpec:
    """A random scene of min_objects..max_objects objects (one frame when `still`)."""
    height, width, fps, frames = sample_canvas(rng, config)
    if still:
        frames = 1
    background = sample_background(rng, height, width, frames / fps, kinds=tuple(config.backgrounds), pan=not still)
    objects: list[ObjectSpec] = []
    for i in range(int(rng.integers(min_objects, config.max_objects + 1))):
        objects.append(sample_object(rng, i + 1, height, width, objects, radius_range=tuple(config.radius_range),
                                     textures=tuple(config.textures), upright=config.upright,
                                     start_spread=config.start_spread, speed_range=tuple(config.speed_range)))
    return SceneSpec(height, width, fps, frames, background, objects, collisions=collisions)


def identity_look(seed: int, identity: int) -> tuple[str, list[list[str]]]:
    """The fixed shape and 3x3 patchwork colours of an identity (independent of split and clip)."""
    rng = np.random.default_rng([seed, 99, identity])
    names = list(OBJECT_COLOURS)
    colours = [names[i] for i in rng.choice(len(names), size=3, replace=False)]
    grid = [[colours[int(rng.integers(3))] for _ in range(3)] for _ in range(3)]
    return _pick(rng, [s for s in SHAPES if s != "circle"]), grid


# ----------------------------------------------------------------------------------------------------------------
# samples


def _npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def _object_record(obj: ObjectSpec, trajectory: Trajectory, index: int) -> dict:
    record = {k: v for k, v in asdict(obj).items() if k not in ("patchwork",) or v}
    record["rgb"] = list(obj.rgb)
    record["positions"] = np.round(trajectory.positions[index], 2).tolist()
    record["angles"] = np.round(trajectory.angles[index], 2).tolist()
    record["scales"] = np.round(trajectory.scales[index], 4).tolist()
    return record


def scene_record(scene: SceneSpec, trajectory: Trajectory, frames: np.ndarray) -> dict:
    """The json ground truth common to every kind: canvas, timing, background, objects, events, motion."""
    return {
        "width": scene.width,
        "height": scene.height,
        "fps": scene.fps,
        "num_frames": scene.num_frames,
        "duration": scene.duration,
        "background": asdict(scene.background),
        "objects": [_object_record(o, trajectory, i) for i, o in enumerate(scene.objects)],
        "events": trajectory.events,
        "motion_score": motion_score(frames),
        "motion_bucket": motion_bucket(motion_score(frames)),
    }


@dataclass
class Rendered:
    """A simulated and rendered scene."""

    scene: SceneSpec
    trajectory: Trajectory
    frames: np.ndarray
    labels: np.ndarray


def realise(scene: SceneSpec) -> Rendered:
    """simulate + render."""
    trajectory = simulate(scene)
    frames, labels = render(scene, trajectory)
    return Rendered(scene, trajectory, frames, labels)


def make_scene(config: WorldConfig, split: str, index: int) -> tuple[Rendered, dict]:
    """A scene clip with its sound: (rendered scene, extra json fields incl. the audio caption)."""
    rng = rng_for(config.seed, "scenes", split, index)
    rendered = realise(sample_scene(rng, config))
    shapes = {o.id: o.shape for o in rendered.scene.objects}
    return rendered, {"audio_caption": captions.sound_caption(rendered.trajectory.events, shapes)}


def make_identity_clip(config: WorldConfig, split: str, index: int) -> tuple[Rendered, int]:
    """Clip `index` of the split: identity `config.identity(split, index)`, alone or with a distractor."""
    identity = config.identity(split, index)
    rng = rng_for(config.seed, "identities", split, index)
    shape, grid = identity_look(config.seed, identity)
    height, width, fps, frames = sample_canvas(rng, config)
    background = sample_background(rng, height, width, frames / fps, kinds=tuple(config.backgrounds))
    hero = sample_object(rng, 1, height, width, [], radius_range=tuple(config.identity_radius_range))
    hero = replace(hero, shape=shape, texture="solid", identity=identity, patchwork=grid, colour=grid[1][1])
    objects = [hero]
    if rng.random() < 0.5:
        objects.append(sample_object(rng, 2, height, width, objects))
    return realise(SceneSpec(height, width, fps, frames, background, objects)), identity


@lru_cache(maxsize=32)
def _identity_crops(config_json: str, split: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    """`clip_references` of identity clip `index` (its hero is object 1): cached, since every clip of an identity
    is rendered again for its siblings' cross-pairs, and siblings are generated one after another."""
    rendered, _ = make_identity_clip(WorldConfig(**json.loads(config_json)), split, index)
    return clip_references(rendered.frames, rendered.labels == 1, REFERENCE_SIZE)


def identity_references(config: WorldConfig, split: str, index: int) -> dict[str, np.ndarray]:
    """The `ref.npz` arrays of identity clip `index` (see `datamodules.references`): paired crops of its own
    frames, and one crop of a random eligible frame of each other clip of its identity in the split."""
    key = json.dumps(config.to_dict(), sort_keys=True)
    paired, paired_frames = _identity_crops(key, split, index)
    per = config.clips_per_identity[SPLITS.index(split)]
    first = index // per * per
    siblings = [j for j in range(first, first + per) if j != index]
    rng = np.random.default_rng([config.seed, 98, SPLITS.index(split) + 1, index])  # not the clip's own stream
    cross, frames = [], []
    for j in siblings:
        crops, chosen = _identity_crops(key, split, j)
        k = int(rng.integers(len(crops)))
        cross.append(crops[k])
        frames.append(int(chosen[k]))
    empty = np.zeros((0, *paired.shape[1:]), np.uint8)
    return {"paired": paired, "paired_frames": paired_frames.astype(np.int32),
            "cross": np.stack(cross) if cross else empty, "cross_clips": np.array(siblings, np.int32),
            "cross_frames": np.array(frames, np.int32)}


def make_sticker(config: WorldConfig, split: str, index: int) -> Rendered:
    """One object centred on a plain background, looping with period = clip length."""
    rng = rng_for(config.seed, "stickers", split, index)
    size = config.sticker_size
    frames = int(_pick(rng, list(config.sticker_frames)))
    background = Background("plain", [_pick(rng, ["white", "beige", "lavender", "grey"])])
    obj = sample_object(rng, 1, size, size, [], motion="still", radius_range=(0.24, 0.3))
    loop = _pick(rng, LOOP_MOTIONS)
    amplitude = {"bob": 0.12 * size, "circle": 0.1 * size, "sway": 25.0, "pulse": 0.15, "spin": 0.0}[loop]
    obj = replace(obj, motion="loop", loop=loop, amplitude=float(amplitude), spin=0.0,
                  position=(size / 2 + (0.1 * size if loop == "circle" else 0.0), size / 2))
    if rng.random() < 0.3:
        shape, grid = identity_look(config.seed, 1000 + int(rng.integers(1000)))
        obj = replace(obj, shape=shape, patchwork=grid, colour=grid[1][1], texture="solid")
    return realise(SceneSpec(size, size, config.sticker_fps, frames, background, [obj], collisions=False))


def make_edit(config: WorldConfig, split: str, index: int) -> tuple[Rendered, Rendered, dict]:
    """(source, target, edit record): the target differs from the source by one edit of one object.

    Collisions are off, so every object's trajectory is independent of the others and both clips share
    the trajectories of all untouched objects: outside the edited object's masks the pixels are equal.
    """
    rng = rng_for(config.seed, "edits", split, index)
    source = sample_scene(rng, config, collisions=False)
    kinds = EDIT_KINDS if len(source.objects) > 1 else ("recolour", "replace", "add")
    if len(source.objects) >= config.max_objects + 1:
        kinds = tuple(k for k in kinds if k != "add")
    kind = _pick(rng, list(kinds))
    objects = list(source.objects)
    before = after = None
    if kind == "add":
        after = sample_object(rng, max(o.id for o in objects) + 1, source.height, source.width, objects,
                              radius_range=tuple(config.added_radius_range), textures=tuple(config.textures),
                              upright=config.upright, start_spread=config.start_spread,
                              speed_range=tuple(config.speed_range))
        objects.append(after)
    else:
        position = int(rng.integers(len(objects)))
        before = objects[position]
        if kind == "remove":
            objects.pop(position)
        elif kind == "recolour":
            used = {(o.shape, o.colour) for o in objects}
            colour = _pick(rng, [c for c in OBJECT_COLOURS if (before.shape, c) not in used])
            after = objects[position] = replace(before, colour=colour)
        else:
            used = {(o.shape, o.colour) for o in objects}
            shape = _pick(rng, [s for s in SHAPES if (s, before.colour) not in used])
            after = objects[position] = replace(before, shape=shape)
    target = replace(source, objects=objects)
    record = {
        "kind": kind,
        "instruction": captions.edit_instruction(kind, before, after),
        "object": (after or before).id,
        "source_caption": captions.scene_caption(source),
        "target_caption": captions.scene_caption(target),
    }
    return realise(source), realise(target), record


def world_samples(config: WorldConfig, kind: str, split: str) -> Iterator[dict]:
    """Shard samples of one kind and split (keys as in the shard schema of `datamodules.write_shards`)."""
    if kind not in KINDS or split not in SPLITS:
        raise ValueError(f"kind must be one of {KINDS} and split one of {SPLITS}, got {kind!r}, {split!r}")
    for index in range(config.count(kind, split)):
        yield world_sample(config, kind, split, index)


def world_sample(config: WorldConfig, kind: str, split: str, index: int) -> dict:
    """Sample `index` of (kind, split) as a shard sample dict."""
    key = f"{kind}-{split}-{index:06d}"
    base = {"world": {"seed": config.seed, "kind": kind, "split": split, "index": index}}
    video = lambda frames, fps: encode_frames(frames, fps, crf=config.crf, threads=1)
    if kind == "images":
        rendered = realise(sample_scene(rng_for(config.seed, kind, split, index), config, still=True))
        caption = captions.scene_caption(rendered.scene, still=True)
        meta = {**base, "kind": "image", **scene_record(rendered.scene, rendered.trajectory, rendered.frames),
                "caption": caption}
        return {"__key__": key, "png": encode_image(rendered.frames[0]), "txt": caption, "json": meta,
                "mask.npz": _npz(labels=rendered.labels)}
    if kind == "edits":
        source, target, edit = make_edit(config, split, index)
        meta = {**base, "kind": "video", **scene_record(source.scene, source.trajectory, source.frames),
                "caption": edit["source_caption"], "edit": edit,
                "target_objects": [_object_record(o, target.trajectory, i) for i, o in enumerate(target.scene.objects)]}
        return {"__key__": key, "mp4": video(source.frames, source.scene.fps),
                "edit.mp4": video(target.frames, target.scene.fps), "txt": edit["instruction"], "json": meta,
                "mask.npz": _npz(labels=source.labels, target_labels=target.labels)}
    if kind == "stickers":
        rendered = make_sticker(config, split, index)
        obj = rendered.scene.objects[0]
        caption = captions.sticker_caption(obj)
        middle = rendered.scene.num_frames // 2
        meta = {**base, "kind": "video", **scene_record(rendered.scene, rendered.trajectory, rendered.frames),
                "caption": caption, "sticker": {"loop": obj.loop, "middle_frame": middle}}
        return {"__key__": key, "mp4": video(rendered.frames, rendered.scene.fps),
                "sticker.png": encode_image(rendered.frames[middle]), "txt": caption, "json": meta,
                "mask.npz": _npz(labels=rendered.labels)}
    if kind == "identities":
        rendered, identity = make_identity_clip(config, split, index)
        extra = {"identity": identity, "identity_token": captions.identity_token(identity)}
        extra_files = {"ref.npz": _npz(**identity_references(config, split, index))}
    else:
        rendered, extra = make_scene(config, split, index)
        extra_files = {}
    caption = captions.scene_caption(rendered.scene)
    scene = rendered.scene
    shapes = {o.id: o.shape for o in scene.objects}
    audio = sonify(rendered.trajectory.events, shapes, scene.duration, config.sample_rate)
    extra.setdefault("audio_caption", captions.sound_caption(rendered.trajectory.events, shapes))
    meta = {**base, "kind": "video", **scene_record(scene, rendered.trajectory, rendered.frames),
            "caption": caption, "audio_rate": config.sample_rate, "audio_channels": 1, **extra}
    return {"__key__": key, "mp4": video(rendered.frames, scene.fps), "wav": encode_audio(audio, config.sample_rate),
            "txt": caption, "json": meta, "mask.npz": _npz(labels=rendered.labels), **extra_files}
