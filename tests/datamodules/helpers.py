"""Small real media and shards for the datamodule tests (h264 mp4 and wav through PyAV, tar via webdataset)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import webdataset as wds

from datamodules.media import encode_audio, encode_frames

SIZE, FRAMES, FPS, RATE = 32, 8, 8.0, 8000


def clip(seed: int, frames: int = FRAMES, height: int = SIZE, width: int = SIZE, fps: float = FPS) -> bytes:
    """An h264 mp4 whose frame k is a flat colour with red = 20 * k and green/blue set by the seed."""
    rng = np.random.default_rng(seed)
    pixels = np.zeros((frames, height, width, 3), dtype=np.uint8)
    pixels[..., 0] = (np.arange(frames) * 20 % 256)[:, None, None]
    pixels[..., 1:] = rng.integers(30, 220, size=2)
    return encode_frames(pixels, fps)


def wav(seconds: float = FRAMES / FPS, rate: int = RATE, pitch: float = 440.0) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    return encode_audio((0.5 * np.sin(2 * np.pi * pitch * t)).astype(np.float32)[None], rate)


def video_sample(key: str, seed: int, caption: bool = True, audio: bool = True, meta: bool = True, **kw) -> dict:
    """A good text-video(-audio) sample with json metadata like make_shards writes."""
    frames, size, fps = kw.get("frames", FRAMES), kw.get("height", SIZE), kw.get("fps", FPS)
    width = kw.get("width", SIZE)
    sample = {"__key__": key, "mp4": clip(seed, frames, size, width, fps)}
    if caption:
        sample["txt"] = f"clip {key}"
    if audio:
        sample["wav"] = wav(frames / fps)
    if meta:
        sample["json"] = {"kind": "video", "width": width, "height": size, "fps": fps, "num_frames": frames,
                          "duration": frames / fps, "caption": f"clip {key}"}
    return sample


def write_tar(path: Path, samples: list[dict]) -> Path:
    """One tar shard of raw samples (values bytes/str/dict), written with webdataset's TarWriter."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path), encoder=False, mtime=0.0) as writer:
        for sample in samples:
            record = {k: (json.dumps(v).encode() if isinstance(v, dict) else v.encode() if isinstance(v, str) else v)
                      for k, v in sample.items() if k != "__key__"}
            writer.write({"__key__": sample["__key__"], **record})
    return path


def truncate(path: Path, fraction: float) -> Path:
    """Cut a file to `fraction` of its bytes (a truncated tar)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def good_shards(folder: Path, shards: int, per_shard: int, **kw) -> list[str]:
    """`shards` tar files of `per_shard` good samples each, keys s<shard>-<i>."""
    paths = []
    for s in range(shards):
        samples = [video_sample(f"s{s}-{i}", 1000 * s + i, **kw) for i in range(per_shard)]
        paths.append(str(write_tar(folder / f"shard-{s:06d}.tar", samples)))
    return paths
