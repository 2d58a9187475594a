"""Per-modality sample handlers for the shard pipeline: bucket by metadata, decode with PyAV, collate.

Batch keys (CONVENTIONS.tmp.md): "video" float32 [B, 3, T, H, W] in [-1, 1] (an image is T = 1), "audio"
float32 [B, C, S] in [-1, 1] with "sample_rate" int, "text" list[str], "fps" float32 [B] (0 for images),
"key" list[str], "meta" list[dict] (the sample's json). Optional: "labels" int64 [B, T, H, W] (label maps,
`labels == id` selects object `id`), "target_video" (the `edit.mp4` of an edit pair, decoded with the same
frames and crop as "video"; with "labels" also its "target_labels"), "reference" float32 [B, 3, S, S] in [-1, 1] with "reference_from" list[dict] (a
masked crop of the clip's identity, paired or cross-paired: `datamodules.references`).

Handlers: `bucket(sample)` (metadata only), `load(sample, bucket, rng)` in the loader's worker (video frames
stay uint8 [T, H, W, 3]), `collate(items)` (in the worker; tensors land in shared memory) and `finalize(batch)`
in the main process (uint8 frames -> float32 [B, 3, T, H, W]). `decode(sample, bucket, rng)` gives one sample
in its final float form, for code that decodes samples one by one (e.g. encoding shards with the TAE).

Buckets (`BucketTable`): a sample goes to the size (h, w) whose aspect ratio is nearest in log space,
argmin |log(W/H) - log(w/h)|, and to the longest clip length T with T <= floor(duration * fps); a clip
shorter than every T is skipped as "too_short". Batch size per bucket: `batch_sizes[name]` if given, else
with `scale_batch_size` floor(batch_size * V_max / V) capped at `max_batch_size` (V = T * h * w; the largest
bucket gets `batch_size`, smaller ones a similar pixel budget, as Movie Gen buckets do), else `batch_size`.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

from datamodules.media import (
    DecodedVideo,
    MediaDecodeError,
    crop_box,
    crop_resize_frames,
    decode_audio,
    decode_image,
    decode_video,
    duration_frames,
    frames_to_video,
    probe_audio,
    probe_image,
    probe_video,
    resize_crop_labels,
)
from datamodules.memory import MemoryLRU
from datamodules.references import MODES, pick_reference, read_references
from datamodules.sources import Bucket, SkipSample

VIDEO_KEYS = ("mp4", "webm", "mov", "mkv")
IMAGE_KEYS = ("jpg", "jpeg", "png")
AUDIO_KEYS = ("wav", "flac")


@dataclass
class BucketTable:
    """Sizes x clip lengths -> buckets with batch sizes (see module doc)."""

    sizes: list[tuple[int, int]]
    frames: list[int] = field(default_factory=lambda: [1])
    batch_size: int = 8
    batch_sizes: dict[str, int] = field(default_factory=dict)
    scale_batch_size: bool = True
    max_batch_size: int | None = None

    def __post_init__(self) -> None:
        self.sizes = [(int(h), int(w)) for h, w in self.sizes]
        self.frames = sorted(int(t) for t in self.frames)
        if not self.sizes or not self.frames or min(self.frames) < 1 or self.batch_size < 1:
            raise ValueError(f"bucket table needs sizes, frames >= 1 and batch_size >= 1: {self}")
        cap = self.max_batch_size or 4 * self.batch_size
        largest = max(h * w * t for h, w in self.sizes for t in self.frames)
        self.buckets: dict[tuple[int, int, int], Bucket] = {}
        for h, w in self.sizes:
            for t in self.frames:
                name = f"{h}x{w}x{t}"
                size = self.batch_size
                if self.scale_batch_size:
                    size = min(cap, max(1, math.floor(self.batch_size * largest / (h * w * t))))
                size = int(self.batch_sizes.get(name, size))
                self.buckets[(h, w, t)] = Bucket(name, size, height=h, width=w, frames=t)
        unknown = set(self.batch_sizes) - {b.name for b in self.buckets.values()}
        if unknown:
            raise ValueError(f"batch_sizes names unknown buckets {sorted(unknown)}; buckets are "
                             f"{sorted(b.name for b in self.buckets.values())}")

    def pick(self, width: int, height: int, available_frames: int = 1) -> Bucket | None:
        """The bucket of a width x height source with `available_frames` frames (None: too short)."""
        aspect = math.log(width / height)
        h, w = min(self.sizes, key=lambda s: abs(math.log(s[1] / s[0]) - aspect))
        fitting = [t for t in self.frames if t <= available_frames]
        return self.buckets[(h, w, fitting[-1])] if fitting else None


def read_meta(sample: dict[str, Any]) -> dict:
    """The sample's json as a dict ({} if absent); SkipSample("bad_json") if it does not parse."""
    raw = sample.get("json")
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SkipSample("bad_json", str(exc)) from exc
    if not isinstance(meta, dict):
        raise SkipSample("bad_json", f"expected an object, got {type(meta).__name__}")
    return meta


def read_text(sample: dict[str, Any], required: bool, meta: dict | None = None, meta_key: str | None = None) -> str:
    """The caption: meta[meta_key] if given and present, else `txt`; SkipSample("no_caption") if required."""
    text = ""
    if meta_key and meta and isinstance(meta.get(meta_key), str):
        text = meta[meta_key]
    if not text and sample.get("txt") is not None:
        text = sample["txt"].decode("utf-8", errors="replace")
    text = text.strip()
    if required and not text:
        raise SkipSample("no_caption", "no txt caption")
    return text


def read_labels(sample: dict[str, Any], name: str = "labels") -> np.ndarray:
    """uint8 label maps [T, H, W] from `mask.npz` (np.load with allow_pickle=False)."""
    if "mask.npz" not in sample:
        raise SkipSample("missing_mask", "no mask.npz")
    try:
        with np.load(io.BytesIO(sample["mask.npz"]), allow_pickle=False) as archive:
            labels = archive[name]
    except (OSError, KeyError, ValueError) as exc:
        raise SkipSample("bad_mask", str(exc)) from exc
    if labels.ndim != 3:
        raise SkipSample("bad_mask", f"labels must be [T, H, W], got {labels.shape}")
    return labels


def read_reference(sample: dict[str, Any], mode: str, size: int, index: int,
                   rng: np.random.Generator | None) -> tuple[torch.Tensor, dict[str, Any]]:
    """A reference of the sample (`datamodules.references.pick_reference` on its `ref.npz`) as float32 [3, size,
    size] in [-1, 1], and where it comes from; SkipSample("bad_reference") if unreadable or absent for `mode`."""
    try:
        crop, source = pick_reference(read_references(sample["ref.npz"]), mode, index, rng)
    except (OSError, KeyError, ValueError) as exc:
        raise SkipSample("bad_reference", str(exc)) from exc
    image = frames_to_video(torch.from_numpy(crop)[None])[:, 0]  # [3, S, S]
    if image.shape[-1] != size:
        image = torch.nn.functional.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True,
                                                align_corners=False)[0]
    return image, source


def stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack; inside a DataLoader worker the result is allocated in shared memory, which saves the
    copy the worker would otherwise make to send it to the main process."""
    if get_worker_info() is None:
        return torch.stack(tensors)
    out = torch.empty((len(tensors), *tensors[0].shape), dtype=tensors[0].dtype).share_memory_()
    return torch.stack(tensors, out=out)


def _first(sample: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if k in sample), None)


def finalize_video(batch: dict[str, Any]) -> dict[str, Any]:
    """Main-process step: uint8 frames [B, T, H, W, 3] from the workers -> "video" float32 [B, 3, T, H, W].

    Workers ship the frames as decoded (uint8, channels last: 4x less shared memory, no transposes) and the
    otherwise idle main process converts them (same for "target_video")."""
    for name in ("video", "target_video"):
        if name in batch and batch[name].dtype == torch.uint8:
            batch[name] = frames_to_video(batch[name])
    return batch


class FrameHandler:
    """Shared by video and image handlers: `load` (worker side) keeps frames uint8 [T, H, W, 3]; `decode` is
    the same sample as float32 [3, T, H, W] in [-1, 1], for callers that decode samples one by one."""

    def load(self, sample: dict[str, Any], bucket: Bucket, rng: np.random.Generator) -> dict[str, Any]:
        raise TypeError(f"{type(self).__name__} must define load()")

    def decode(self, sample: dict[str, Any], bucket: Bucket, rng: np.random.Generator) -> dict[str, Any]:
        """`load` + the uint8 -> float conversion of "video" (and "target_video")."""
        item = self.load(sample, bucket, rng)
        for name in ("video", "target_video"):
            if name in item:
                item[name] = frames_to_video(item[name])
        return item

    def finalize(self, batch: dict[str, Any]) -> dict[str, Any]:
        return finalize_video(batch)


class ClipCache(MemoryLRU):
    """Decoded clips, and their crops resized to the training size, kept in memory (`memory.MemoryLRU`), up to
    `max_mb` of frames.

    A decoded clip's key is the sample (shard URL, key, media member) and the times decoded (frames, fps, start),
    so a hit returns exactly what `decode_video` would. A resized crop's key adds the size and the crop box
    (`media.crop_box`), so a hit returns exactly what `crop_resize_frames` would: a random crop offset that
    selects the same box (any offset, when the clip already has the target's aspect) hits too. A crop that
    needs no resize is a view of the clip and is not kept twice. The resize is most of a cached batch's loading
    time (the quickstart: 26 -> 8 ms a batch). A clip as long as the training clips always starts at 0 (the
    quickstart's 1 s clips), so from its second pass on nothing is decoded or resized; longer clips hit only in
    validation, where the start is fixed.
    """

    def decode(self, sample: dict[str, Any], member: str, num_frames: int, fps: float, start: float) -> DecodedVideo:
        key = (sample.get("__url__"), sample.get("__key__"), member, num_frames, fps, start)
        clip = self.get(key)
        if clip is None:
            clip = decode_video(sample[member], num_frames, fps, start)  # its frames are only read from then on
            self.put(key, clip, clip.frames.nbytes)
        return clip

    def frames(self, sample: dict[str, Any], member: str, num_frames: int, fps: float, start: float,
               size: tuple[int, int], offset: tuple[float, float]) -> tuple[DecodedVideo, torch.Tensor]:
        """(the decoded clip, its frames through `crop_resize_frames(frames, size, offset)`). A crop that already
        has the target size needs no resize: it is a view of the cached clip, and is not kept twice."""
        clip = self.decode(sample, member, num_frames, fps, start)
        box = crop_box(clip.frames.shape[1], clip.frames.shape[2], size, offset)
        if box[2:] == tuple(size):
            return clip, crop_resize_frames(clip.frames, size, offset)
        key = (sample.get("__url__"), sample.get("__key__"), member, num_frames, fps, start, tuple(size), box)
        frames = self.get(key)
        if frames is None:
            frames = crop_resize_frames(clip.frames, size, offset)
            self.put(key, frames, frames.nbytes)
        return clip, frames


class VideoHandler(FrameHandler):
    """Video clips (+ optional soundtrack, masks, edit target) at `fps` (native fps if None)."""

    def __init__(
        self,
        table: BucketTable,
        fps: float | None = 8.0,
        train: bool = True,
        random_crop: bool = True,
        require_text: bool = True,
        fps_in_caption: bool = False,
        with_masks: bool = False,
        with_target: bool = False,
        audio_rate: int | None = None,
        audio_channels: int = 1,
        min_motion_bucket: int | None = None,
        reference: str | None = None,
        reference_size: int = 32,
        identity_in_caption: bool = True,
        decode_cache_mb: float = 0.0,
    ) -> None:
        if audio_rate and not fps:
            raise ValueError("video with audio needs a fixed fps (clips of equal length have equal audio length)")
        if reference is not None and reference not in MODES:
            raise ValueError(f"reference={reference!r}: choose one of {MODES} (or null)")
        self.table, self.fps, self.train, self.random_crop = table, fps, train, random_crop
        self.require_text, self.fps_in_caption = require_text, fps_in_caption
        self.with_masks, self.with_target = with_masks, with_target
        self.audio_rate, self.audio_channels = audio_rate, audio_channels
        self.min_motion_bucket = min_motion_bucket
        self.reference, self.reference_size = reference, int(reference_size)
        self.identity_in_caption = identity_in_caption
        self.cache = ClipCache(decode_cache_mb) if decode_cache_mb > 0 else None

    def _frames(self, sample: dict[str, Any], member: str, num_frames: int, fps: float, start: float,
                size: tuple[int, int], offset: tuple[float, float]) -> tuple[DecodedVideo, torch.Tensor]:
        """(the decoded clip, its frames cropped and resized to `size`), from the cache when there is one."""
        if self.cache is not None:
            return self.cache.frames(sample, member, num_frames, fps, start, size, offset)
        clip = decode_video(sample[member], num_frames, fps, start)
        return clip, crop_resize_frames(clip.frames, size, offset)

    def _info(self, sample: dict[str, Any], meta: dict, key: str) -> tuple[int, int, float, float]:
        """(width, height, native fps, duration) from the json when complete, else by probing the container."""
        if all(meta.get(k) is not None for k in ("width", "height", "fps", "num_frames")):
            fps = float(meta["fps"])
            frames = int(meta["num_frames"])
            duration = float(meta.get("duration") or (frames / fps if fps > 0 else 0.0))
            if frames <= 0 or duration <= 0 or fps <= 0:
                raise SkipSample("zero_length", f"json says {frames} frames, {duration:.3f}s")
            if len(sample[key]) == 0:
                raise SkipSample("zero_length", f"empty {key}")
            return int(meta["width"]), int(meta["height"]), fps, duration
        info = probe_video(sample[key])
        return info.width, info.height, info.fps, info.duration

    def bucket(self, sample: dict[str, Any]) -> Bucket:
        meta = read_meta(sample)
        read_text(sample, self.require_text)
        key = _first(sample, VIDEO_KEYS)
        if key is None:
            raise SkipSample("missing_media", f"no video ({'/'.join(VIDEO_KEYS)})")
        width, height, native, duration = self._info(sample, meta, key)
        fps = self.fps or native
        bucket = self.table.pick(width, height, duration_frames(duration, fps))
        if bucket is None:
            raise SkipSample("too_short", f"{duration:.2f}s at {fps:g} fps < {self.table.frames[0]} frames")
        if self.min_motion_bucket is not None:
            if "motion_bucket" not in meta:
                raise SkipSample("no_motion_bucket", "json has no motion_bucket (shards written before motion "
                                 "buckets: write them again) while min_motion_bucket is set")
            if int(meta["motion_bucket"]) < self.min_motion_bucket:
                raise SkipSample("low_motion", f"motion bucket {meta['motion_bucket']} < {self.min_motion_bucket}")
        if self.with_target and "edit.mp4" not in sample:
            raise SkipSample("missing_media", "no edit.mp4 target")
        if self.reference and "ref.npz" not in sample:
            raise SkipSample("missing_reference", "no ref.npz (identity clips written before reference crops: "
                             "delete the world folder to write it again)")
        if self.audio_rate and _first(sample, AUDIO_KEYS) is None and not meta.get("audio_rate"):
            if not probe_video(sample[key]).has_audio:
                raise SkipSample("missing_audio", "no wav/flac and no audio track")
        return bucket

    def load(self, sample: dict[str, Any], bucket: Bucket, rng: np.random.Generator) -> dict[str, Any]:
        meta = read_meta(sample)
        text = read_text(sample, self.require_text)
        key = _first(sample, VIDEO_KEYS)
        width, height, native, duration = self._info(sample, meta, key)
        fps = float(self.fps or native)
        span = bucket.frames / fps
        start = float(rng.uniform(0.0, max(0.0, duration - span))) if self.train else 0.0
        offset = (float(rng.uniform()), float(rng.uniform())) if self.train and self.random_crop else (0.5, 0.5)
        size = (bucket.height, bucket.width)
        clip, frames = self._frames(sample, key, bucket.frames, fps, start, size, offset)
        if not self.identity_in_caption and meta.get("identity_token"):  # "The zq3 star ..." -> "The star ..."
            text = text.replace(f"{meta['identity_token']} ", "")
        item: dict[str, Any] = {
            "video": frames,
            "text": f"FPS-{fps:g} {text}" if self.fps_in_caption else text,
            "fps": fps,
            "start": start,  # seconds into the source: the json's event times are relative to its beginning
            "meta": meta,
        }
        if self.with_masks:
            labels = read_labels(sample)
            item["labels"] = resize_crop_labels(labels[np.clip(clip.indices, 0, len(labels) - 1)], size, offset)
        if self.with_target:
            target, item["target_video"] = self._frames(sample, "edit.mp4", bucket.frames, fps, start, size, offset)
            if self.with_masks:  # an edit pair's target label maps ("target_labels" of its mask.npz)
                labels = read_labels(sample, "target_labels")
                item["target_labels"] = resize_crop_labels(labels[np.clip(target.indices, 0, len(labels) - 1)],
                                                           size, offset)
        if self.reference:
            index = int((meta.get("world") or {}).get("index", -1))
            # validation: a fixed draw per clip (seeded by its index), so that clips of an identity differ
            draw = rng if self.train else np.random.default_rng(max(index, 0))
            item["reference"], item["reference_from"] = read_reference(sample, self.reference, self.reference_size,
                                                                       index, draw)
        if self.audio_rate:
            source = sample.get(_first(sample, AUDIO_KEYS) or key)
            try:
                item["audio"], _ = decode_audio(source, self.audio_rate, self.audio_channels, start, span)
            except MediaDecodeError as exc:
                raise SkipSample("undecodable_audio", exc.detail) from exc
        return item

    def collate(self, items: list[dict[str, Any]], bucket: Bucket) -> dict[str, Any]:
        batch: dict[str, Any] = {
            "video": stack([i["video"] for i in items]),
            "text": [i["text"] for i in items],
            "fps": torch.tensor([i["fps"] for i in items], dtype=torch.float32),
            "start": torch.tensor([i["start"] for i in items], dtype=torch.float64),
            "meta": [i["meta"] for i in items],
        }
        for name in ("labels", "target_video", "target_labels", "audio", "reference"):
            if name in items[0]:
                batch[name] = stack([i[name] for i in items])
        if self.reference:
            batch["reference_from"] = [i["reference_from"] for i in items]
        if self.audio_rate:
            batch["sample_rate"] = int(self.audio_rate)
        return batch


class ImageHandler(FrameHandler):
    """Images (jpg/png) as one-frame videos [3, 1, H, W]; fps 0."""

    def __init__(self, table: BucketTable, train: bool = True, random_crop: bool = True,
                 require_text: bool = True, with_masks: bool = False) -> None:
        self.table, self.train, self.random_crop = table, train, random_crop
        self.require_text, self.with_masks = require_text, with_masks

    def bucket(self, sample: dict[str, Any]) -> Bucket:
        meta = read_meta(sample)
        read_text(sample, self.require_text)
        key = _first(sample, IMAGE_KEYS)
        if key is None:
            raise SkipSample("missing_media", f"no image ({'/'.join(IMAGE_KEYS)})")
        if meta.get("width") and meta.get("height") and sample[key]:
            width, height = int(meta["width"]), int(meta["height"])
        else:
            width, height = probe_image(sample[key])
        return self.table.pick(width, height, 1)

    def load(self, sample: dict[str, Any], bucket: Bucket, rng: np.random.Generator) -> dict[str, Any]:
        meta = read_meta(sample)
        image = decode_image(sample[_first(sample, IMAGE_KEYS)])
        offset = (float(rng.uniform()), float(rng.uniform())) if self.train and self.random_crop else (0.5, 0.5)
        size = (bucket.height, bucket.width)
        item = {"video": crop_resize_frames(image[None], size, offset), "text": read_text(sample, self.require_text),
                "fps": 0.0, "meta": meta}
        if self.with_masks:
            item["labels"] = resize_crop_labels(read_labels(sample)[:1], size, offset)
        return item

    def collate(self, items: list[dict[str, Any]], bucket: Bucket) -> dict[str, Any]:
        batch = {
            "video": stack([i["video"] for i in items]),
            "text": [i["text"] for i in items],
            "fps": torch.zeros(len(items), dtype=torch.float32),
            "meta": [i["meta"] for i in items],
        }
        if self.with_masks:
            batch["labels"] = stack([i["labels"] for i in items])
        return batch


class AudioHandler:
    """Audio clips of the bucket durations (seconds) at `sample_rate`, from wav/flac or a video's audio track.

    Duration buckets: the longest d in `durations` with d <= the track's duration; batch size per bucket as
    for video (the longest bucket gets `batch_size`, shorter ones floor(batch_size * d_max / d) up to the cap).
    The caption is meta[caption_key] when present (e.g. the synthetic world's "audio_caption"), else `txt`.
    """

    def __init__(self, durations: list[float], sample_rate: int = 16000, channels: int = 1, batch_size: int = 8,
                 batch_sizes: dict[str, int] | None = None, scale_batch_size: bool = True,
                 max_batch_size: int | None = None, train: bool = True, require_text: bool = True,
                 caption_key: str | None = "audio_caption", from_video: bool = True) -> None:
        self.durations = sorted(float(d) for d in durations)
        if not self.durations or self.durations[0] <= 0:
            raise ValueError(f"durations must be positive seconds, got {durations}")
        self.sample_rate, self.channels = int(sample_rate), int(channels)
        self.train, self.require_text, self.caption_key, self.from_video = train, require_text, caption_key, from_video
        cap = max_batch_size or 4 * batch_size
        overrides = batch_sizes or {}
        self.buckets = {}
        for d in self.durations:
            name = f"{d:g}s"
            size = min(cap, max(1, math.floor(batch_size * self.durations[-1] / d))) if scale_batch_size else batch_size
            self.buckets[d] = Bucket(name, int(overrides.get(name, size)),
                                     audio_samples=int(round(d * self.sample_rate)))

    def _source(self, sample: dict[str, Any]) -> str:
        key = _first(sample, AUDIO_KEYS) or (_first(sample, VIDEO_KEYS) if self.from_video else None)
        if key is None:
            raise SkipSample("missing_audio", "no wav/flac" + (" or video" if self.from_video else ""))
        if len(sample[key]) == 0:
            raise SkipSample("zero_length", f"empty {key}")
        return key

    def _duration(self, sample: dict[str, Any], meta: dict, key: str) -> float:
        if key in AUDIO_KEYS and meta.get("duration") and meta.get("audio_rate"):
            return float(meta["duration"])
        try:
            return probe_audio(sample[key]).duration
        except MediaDecodeError as exc:
            raise SkipSample("undecodable_audio" if exc.reason != "zero_length" else "zero_length", exc.detail) from exc

    def bucket(self, sample: dict[str, Any]) -> Bucket:
        meta = read_meta(sample)
        read_text(sample, self.require_text, meta, self.caption_key)
        duration = self._duration(sample, meta, self._source(sample))
        fitting = [d for d in self.durations if d <= duration + 1e-6]
        if not fitting:
            raise SkipSample("too_short", f"{duration:.2f}s < {self.durations[0]:g}s")
        return self.buckets[fitting[-1]]

    def decode(self, sample: dict[str, Any], bucket: Bucket, rng: np.random.Generator) -> dict[str, Any]:
        meta = read_meta(sample)
        key = self._source(sample)
        seconds = bucket.audio_samples / self.sample_rate
        duration = self._duration(sample, meta, key)
        start = float(rng.uniform(0.0, max(0.0, duration - seconds))) if self.train else 0.0
        try:
            audio, _ = decode_audio(sample[key], self.sample_rate, self.channels, start, seconds)
        except MediaDecodeError as exc:
            raise SkipSample("undecodable_audio", exc.detail) from exc
        return {"audio": audio, "text": read_text(sample, self.require_text, meta, self.caption_key), "meta": meta}

    load = decode  # worker side and per-sample decoding are the same for audio

    def collate(self, items: list[dict[str, Any]], bucket: Bucket) -> dict[str, Any]:
        return {
            "audio": stack([i["audio"] for i in items]),
            "sample_rate": self.sample_rate,
            "text": [i["text"] for i in items],
            "meta": [i["meta"] for i in items],
        }
