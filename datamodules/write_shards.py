"""Writing shards: a folder of media + captions, or the synthetic shapes world -> WebDataset tar shards.

Shard schema (format "mediagen-shards/1")
-----------------------------------------
A shard set is a folder of `shard-000000.tar, shard-000001.tar, ...` plus `index.json`. In a tar, the files
of one sample share a key (`<key>.<ext>`, the key has no dots) and sit next to each other:

  mp4 | webm | mov | mkv   a video (H.264 yuv420p mp4 recommended); may hold an audio track
  jpg | png               an image
  wav | flac              an audio track (for a video: its soundtrack, time-aligned from 0 s)
  txt                     the caption, UTF-8 (required by the text-conditioned datamodules)
  json                    metadata: kind ("video" | "image" | "audio"), width, height, fps, num_frames,
                          duration (s), audio_rate, audio_channels, source (original path), caption, plus any
                          metadata columns; the synthetic world adds its ground truth (objects with per-frame
                          positions, events, background, identity, edit, sticker, audio_caption, motion_score)
  mask.npz                uint8 label maps: "labels" [T, H, W], 0 = background, i = object id i (visible
                          pixels); edits add "target_labels". Read with np.load(..., allow_pickle=False)
  edit.mp4                the target clip of an edit pair (source is `mp4`, instruction is `txt`)
  sticker.png             the still sticker (middle frame) of a sticker clip

Nothing in a shard is ever unpickled: readers decode only the extensions above.

`index.json`: {"format", "num_samples", "num_shards", "shards": [{"name", "num_samples", "bytes"}],
"stats": {kinds, captions, missing_captions, seconds, fps, sizes, audio_rates}, "skipped": [{"path",
"reason", "detail"}]}; a folder's index also has "missing_caption" (the policy), "empty_captions" and
"ignored" (files that are not media). Shard names are relative to the index's folder.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import webdataset as wds

from datamodules.media import (
    MediaDecodeError,
    decode_audio,
    decode_image,
    probe_audio,
    probe_video,
    scan_video,
)
from datamodules.synthetic.world import motion_bucket

if TYPE_CHECKING:  # parts.py imports this module (its schema and statistics)
    from datamodules.parts import Part

SCHEMA = "mediagen-shards/1"
VIDEO_EXTENSIONS = ("mp4", "webm", "mov", "mkv")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png")
AUDIO_EXTENSIONS = ("wav", "flac")
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "captions.jsonl", "captions.csv")
INDEX = "index.json"
MISSING_CAPTION_POLICIES = ("skip", "empty", "fail")


class MissingCaptionError(ValueError):
    """A media file without a caption under missing_caption=fail; the message names the file."""


def parse_size(value: int | float | str) -> int:
    """Bytes from 12345, 1.5e9, "200MB", "2GB", "512KiB"."""
    if isinstance(value, int | float):
        return int(value)
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?)(i?)B?\s*", str(value), flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot parse a size from {value!r} (use e.g. 500MB, 2GB or a byte count)")
    number, unit, binary = float(match.group(1)), match.group(2).upper(), match.group(3)
    base = 1024 if binary else 1000
    return int(number * base ** " KMGT".index(unit or " "))


def _to_bytes(key: str, ext: str, value: Any) -> bytes:
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True, ensure_ascii=False).encode("utf-8")
    raise TypeError(f"sample {key!r}: field {ext!r} must be bytes, str or json (dict/list), got {type(value)}")


def write_json(path: str | Path, data: Any) -> None:
    """Write `data` as json to `path` atomically (a temporary file renamed over it): a reader, or a rerun that
    checks whether the file exists, never sees half a file."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    temporary.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(temporary, path)


def sample_stats(meta: dict, stats: dict) -> None:
    """Accumulate a sample's json into shard-set statistics."""
    stats.setdefault("kinds", Counter())[meta.get("kind", "unknown")] += 1
    caption = meta.get("caption")
    stats["captions"] = stats.get("captions", 0) + int(bool(caption))
    stats["missing_captions"] = stats.get("missing_captions", 0) + int(not caption)
    stats["seconds"] = round(stats.get("seconds", 0.0) + float(meta.get("duration") or 0.0), 3)
    if meta.get("fps"):
        stats.setdefault("fps", Counter())[str(round(float(meta["fps"]), 3))] += 1
    if meta.get("width"):
        stats.setdefault("sizes", Counter())[f"{meta['height']}x{meta['width']}"] += 1
    if meta.get("audio_rate"):
        stats.setdefault("audio_rates", Counter())[str(meta["audio_rate"])] += 1


def merge_stats(parts: Iterable[dict]) -> dict:
    """The statistics of shard sets (index.json's "stats", as `sample_stats` builds them) as one: counts and
    per-value tallies summed, seconds summed (to the millisecond, as `sample_stats` rounds them)."""
    merged: dict = {}
    for stats in parts:
        for name, value in stats.items():
            if isinstance(value, dict):
                merged.setdefault(name, Counter()).update(value)
            else:
                merged[name] = merged.get(name, 0) + value
    if "seconds" in merged:
        merged["seconds"] = round(merged["seconds"], 3)
    return {k: dict(v) if isinstance(v, Counter) else v for k, v in merged.items()}


class ShardSink:
    """Write samples into `<output>/shard-%06d.tar`, a new shard after `maxcount` samples or `maxsize` bytes.

    `write({"__key__": key, "mp4": bytes, "txt": str, "json": dict, ...})`; `close()` writes index.json (last,
    atomically: a shard set with an index.json is complete) and returns it. Tar members get mtime 0, so the same
    samples give byte-identical shards.
    """

    def __init__(self, output: str | Path, maxcount: int = 1000, maxsize: int | str = "1GB",
                 prefix: str = "shard") -> None:
        self.output = Path(output)
        self.output.mkdir(parents=True, exist_ok=True)
        self.maxcount, self.maxsize, self.prefix = int(maxcount), parse_size(maxsize), prefix
        if self.maxcount < 1 or self.maxsize < 1:
            raise ValueError(f"maxcount and maxsize must be positive, got {maxcount}, {maxsize}")
        self.shards: list[dict] = []
        self.stats: dict = {}
        self.keys: set[str] = set()
        self._writer: wds.TarWriter | None = None
        self._count = self._size = 0

    def _roll(self) -> None:
        self._finish()
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        # an int: a float mtime makes tarfile add a pax header to every member, a third of the time to read them
        self._writer = wds.TarWriter(str(self.output / name), encoder=False, mtime=0)
        self.shards.append({"name": name, "num_samples": 0, "bytes": 0})
        self._count = self._size = 0

    def _finish(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self.shards[-1]["bytes"] = (self.output / self.shards[-1]["name"]).stat().st_size
            self._writer = None

    def write(self, sample: dict) -> None:
        """Add one sample (keys: "__key__" and extensions; values bytes, str or json-able dict/list)."""
        key = sample.get("__key__")
        if not key or "." in key or "/" in key:
            raise ValueError(f"sample key must be non-empty without '.' or '/', got {key!r}")
        if key in self.keys:
            raise ValueError(f"duplicate sample key {key!r}")
        self.keys.add(key)
        record = {"__key__": key}
        record.update({ext: _to_bytes(key, ext, v) for ext, v in sample.items() if not ext.startswith("__")})
        if self._writer is None or self._count >= self.maxcount or self._size >= self.maxsize:
            self._roll()
        assert self._writer is not None
        self._size += self._writer.write(record)
        self._count += 1
        self.shards[-1]["num_samples"] += 1
        meta = sample.get("json") if isinstance(sample.get("json"), dict) else {}
        if "caption" not in meta and sample.get("txt"):
            meta = {**meta, "caption": sample["txt"]}
        sample_stats(meta, self.stats)

    def close(self, skipped: Iterable[dict] = (), **extra: Any) -> dict:
        """Finish the last shard and write index.json; returns the index."""
        self._finish()
        index = {
            "format": SCHEMA,
            "num_samples": sum(s["num_samples"] for s in self.shards),
            "num_shards": len(self.shards),
            "shards": self.shards,
            "stats": {k: dict(v) if isinstance(v, Counter) else v for k, v in self.stats.items()},
            "skipped": list(skipped),
            **extra,
        }
        write_json(self.output / INDEX, index)
        return index


# ----------------------------------------------------------------------------------------------------------------
# folder -> shards


@dataclass
class FolderReport:
    """What `folder_to_shards` did: the index it wrote, every file it skipped (path, reason, detail), the
    samples written with an empty caption, and the files it ignored (not media)."""

    index: dict
    skipped: list[dict] = field(default_factory=list)
    empty_captions: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def reasons(self) -> Counter:
        """Skipped files by reason (undecodable, zero_length, no_stream, no_caption, unreadable, duplicate)."""
        return Counter(s["reason"] for s in self.skipped)

    def summary(self) -> str:
        """The console report: one line of totals and reasons, then every skipped file with why."""
        files = self.index["num_samples"] + len(self.skipped)
        line = f"wrote {self.index['num_samples']} samples in {self.index['num_shards']} shards"
        if self.skipped:
            reasons = ", ".join(f"{n} {r.replace('_', ' ')}" for r, n in self.reasons().most_common())
            line += f"; skipped {len(self.skipped)} of {files} media files: {reasons}"
        if self.empty_captions:
            line += f"; {len(self.empty_captions)} written with an empty caption (missing_caption=empty)"
        lines = [line]
        lines += [f"  skipped {s['path']}: {s['reason']}" + (f" ({s['detail']})" if s.get("detail") else "")
                  for s in self.skipped]
        lines += [f"  empty caption: {p}" for p in self.empty_captions]
        if self.ignored:
            lines.append(f"  ignored {len(self.ignored)} files that are not media: {', '.join(self.ignored[:10])}"
                         + (" ..." if len(self.ignored) > 10 else ""))
        return "\n".join(lines)


def load_metadata(input_dir: Path, metadata: str | Path | None = None) -> dict[str, dict]:
    """Per-file metadata from a csv (header row) or jsonl file, keyed by the media path relative to input_dir.

    The file column is `file`, `path` or `filename`; the caption column `caption` or `text`; other columns go
    into the sample json. Without `metadata`, the first of METADATA_FILES found in input_dir is used.
    """
    if metadata is None:
        found = [input_dir / name for name in METADATA_FILES if (input_dir / name).is_file()]
        if not found:
            return {}
        path = found[0]
    else:
        path = Path(metadata)
        if not path.is_file():
            raise FileNotFoundError(f"metadata file not found: {path}")
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    elif path.suffix == ".csv":
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    else:
        raise ValueError(f"metadata must be .csv or .jsonl, got {path}")
    table = {}
    for number, row in enumerate(rows, start=1):
        name = row.get("file") or row.get("path") or row.get("filename")
        if not name:
            raise ValueError(f"{path} row {number}: no 'file', 'path' or 'filename' column")
        row = {k: v for k, v in row.items() if k not in ("file", "path", "filename")}
        if "text" in row and "caption" not in row:
            row["caption"] = row.pop("text")
        table[str(Path(name).as_posix())] = row
    return table


def _media_kind(path: Path) -> str | None:
    ext = path.suffix.lower().lstrip(".")
    if ext in VIDEO_EXTENSIONS:
        return "video"
    if ext in IMAGE_EXTENSIONS:
        return "image"
    if ext in AUDIO_EXTENSIONS:
        return "audio"
    return None


def probe_file(data: bytes, kind: str) -> dict:
    """Metadata of one media payload; raises MediaDecodeError if it cannot be decoded. A video is decoded to
    its last frame (a file can break after frames that decode), and its frame count is the decoded one."""
    if kind == "video":
        info = probe_video(data, decode_first_frame=True)
        frames, score = scan_video(data)
        return {"width": info.width, "height": info.height, "fps": info.fps, "num_frames": frames,
                "duration": info.duration, "audio_rate": info.audio_rate, "audio_channels": info.audio_channels,
                "motion_score": score, "motion_bucket": motion_bucket(score)}
    if kind == "image":
        image = decode_image(data)
        return {"width": int(image.shape[1]), "height": int(image.shape[0]), "num_frames": 1}
    info = probe_audio(data)
    decode_audio(data, duration=min(0.1, info.duration))
    return {"duration": info.duration, "audio_rate": info.sample_rate, "audio_channels": info.channels}


def _key_for(relative: Path, taken: set[str]) -> str:
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", relative.with_suffix("").as_posix().replace("/", "__")) or "sample"
    unique, n = key, 1
    while unique in taken:
        n += 1
        unique = f"{key}-{n}"
    taken.add(unique)
    return unique


def folder_to_shards(
    input_dir: str | Path,
    output_dir: str | Path,
    maxcount: int = 1000,
    maxsize: int | str = "1GB",
    metadata: str | Path | None = None,
    progress: bool = True,
    missing_caption: str = "skip",
    part: Part | None = None,
) -> FolderReport:
    """Probe every video/image/audio file under `input_dir` and write the readable ones as shards.

    Files with the same stem in the same folder form one sample (e.g. clip.mp4 + clip.wav + clip.txt); the
    caption is `<stem>.txt` beside the file or the metadata table's caption. Files that cannot be read or
    decoded (videos are decoded to their last frame) are skipped and reported with the reason; a sample is
    written if any of its media files is good. A sample without a caption: `missing_caption="skip"` leaves it
    out (reported as no_caption), "empty" writes it with an empty caption, "fail" stops with
    MissingCaptionError naming the file. Files that are not media are listed as ignored.

    Keys come from the relative paths of all samples in sorted order (made unique with -2, -3, ...), whether a
    sample is written or not, so they do not depend on what other samples decode. With `part`
    (`datamodules.parts.Part`) only the part's range of the samples (and of the ignored files) is handled and
    the index records "part": {"index", "count"}; the parts' indexes merged (`datamodules.parts.merge_parts`)
    equal the index of one run over the folder, shard names aside.
    """
    from tqdm import tqdm

    if missing_caption not in MISSING_CAPTION_POLICIES:
        raise ValueError(f"missing_caption={missing_caption!r}; choose one of {', '.join(MISSING_CAPTION_POLICIES)}")
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.is_dir():
        raise FileNotFoundError(f"input folder not found: {input_dir}")
    if output_dir.resolve().is_relative_to(input_dir.resolve()):
        raise ValueError(f"output {output_dir} must not be inside the input folder {input_dir}")
    table = load_metadata(input_dir, metadata)
    groups: dict[Path, list[Path]] = {}
    ignored: list[str] = []
    captions = set(METADATA_FILES)
    for path in sorted(input_dir.rglob("*")):
        if path.is_file() and _media_kind(path):
            groups.setdefault(path.with_suffix(""), []).append(path)
        elif path.is_file() and path.suffix.lower() != ".txt" and path.name not in captions:
            ignored.append(path.relative_to(input_dir).as_posix())
    taken: set[str] = set()
    keys = {stem: _key_for(stem.relative_to(input_dir), taken) for stem in groups}
    stems = part.take(list(groups)) if part is not None else list(groups)
    ignored = part.take(ignored) if part is not None else ignored
    sink = ShardSink(output_dir, maxcount=maxcount, maxsize=maxsize)
    skipped: list[dict] = []
    empty_captions: list[str] = []
    for stem in tqdm(stems, desc=f"probing ({part})" if part else "probing", unit="sample", disable=not progress):
        files = groups[stem]
        sample: dict[str, Any] = {}
        meta: dict[str, Any] = {"source": []}
        for path in sorted(files, key=lambda f: ("video", "image", "audio").index(_media_kind(f))):
            relative = path.relative_to(input_dir).as_posix()
            kind, ext = _media_kind(path), path.suffix.lower().lstrip(".")
            ext = "jpg" if ext == "jpeg" else ext
            try:
                data = path.read_bytes()
                if not data:
                    raise MediaDecodeError("zero_length", "empty file")
                info = probe_file(data, kind)
            except MediaDecodeError as exc:
                skipped.append({"path": relative, "reason": exc.reason, "detail": exc.detail})
                continue
            except OSError as exc:
                skipped.append({"path": relative, "reason": "unreadable", "detail": str(exc)})
                continue
            if ext in sample:
                skipped.append({"path": relative, "reason": "duplicate",
                                "detail": f"a second {ext} file for the sample {stem.name}"})
                continue
            sample[ext] = data
            sources = meta["source"] + [relative]
            meta.update(table.get(relative, {}))  # metadata columns; probed fields and source take precedence
            meta["source"] = sources
            for name, value in info.items():  # the video's fields first, then what audio/images add
                if name not in meta or (value and not meta[name]):
                    meta[name] = value
            meta.setdefault("kinds", []).append(kind)
        if not sample:
            continue
        kinds = meta.pop("kinds")
        meta["kind"] = next(k for k in ("video", "image", "audio") if k in kinds)
        caption_file = stem.with_suffix(".txt")
        caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.is_file() else ""
        caption = caption or str(meta.get("caption") or "").strip()
        if caption:
            sample["txt"] = meta["caption"] = caption
        elif missing_caption == "fail":
            raise MissingCaptionError(
                f"{', '.join(meta['source'])}: no caption ({caption_file.name} beside it or a caption in the "
                "metadata table); add one, or set missing_caption=skip or missing_caption=empty")
        elif missing_caption == "skip":
            skipped += [{"path": source, "reason": "no_caption",
                         "detail": f"no {caption_file.name} and no caption in the metadata"} for source in meta["source"]]
            continue
        else:
            sample["txt"] = meta["caption"] = ""
            empty_captions.append(", ".join(meta["source"]))
        sample["json"] = meta
        sample["__key__"] = keys[stem]
        sink.write(sample)
    extra = {"part": {"index": part.index, "count": part.count}} if part is not None else {}
    index = sink.close(skipped=skipped, source=str(input_dir), missing_caption=missing_caption,
                       empty_captions=empty_captions, ignored=ignored, **extra)
    return FolderReport(index, skipped, empty_captions, ignored)


# ----------------------------------------------------------------------------------------------------------------
# synthetic world -> shards


def _world_sample(args: tuple) -> dict:
    from datamodules.synthetic import world_sample

    return world_sample(*args)


def _one_thread() -> None:
    """A world worker's initialiser: torch ops in a forked child run single-threaded (the parent's OpenMP pool
    does not survive the fork, and the workers already share the cores)."""
    import torch

    torch.set_num_threads(1)


def write_world(output_dir: str | Path, config: Any = None, kinds: Iterable[str] | None = None,
                workers: int = 0, progress: bool = True, part: Part | None = None) -> Path:
    """Generate the shapes world into `<output>/<kind>/<split>/` shard sets and `<output>/world.json`.

    With `part` (`datamodules.parts.Part`) only the part's range of each set's sample indices is generated, into
    `<output>/<kind>/<split>/parts/<part>/` (sets the part finished before are skipped); `merge_world` then
    joins the parts and writes world.json.
    """
    from multiprocessing import get_context

    from tqdm import tqdm

    from datamodules.parts import open_part  # here: parts.py imports this module
    from datamodules.synthetic import KINDS, SPLITS, WorldConfig

    config = config if isinstance(config, WorldConfig) else WorldConfig(**(config or {}))
    output = Path(output_dir)
    summary = {}
    extra = {"part": {"index": part.index, "count": part.count}} if part is not None else {}
    pool = get_context("fork").Pool(workers, initializer=_one_thread) if workers > 1 else None
    try:
        for kind in kinds or KINDS:
            for split in SPLITS:
                jobs = [(config, kind, split, i) for i in range(config.count(kind, split))]
                folder = output / kind / split
                if part is not None:
                    jobs, folder = part.take(jobs), open_part(folder, part)
                    if folder is None:
                        print(f"{kind}/{split}: {part} already done")
                        continue
                samples = pool.imap(_world_sample, jobs, chunksize=4) if pool else map(_world_sample, jobs)
                sink = ShardSink(folder, maxcount=config.shard_size)
                for sample in tqdm(samples, total=len(jobs), desc=f"{kind}/{split}", disable=not progress):
                    sink.write(sample)
                summary[f"{kind}/{split}"] = sink.close(world=config.to_dict(), **extra)["num_samples"]
    finally:
        if pool:
            pool.close()
    if part is None:
        write_world_summary(output, config.to_dict(), summary)
    return output


def write_world_summary(output: Path, config: dict, sets: dict[str, int]) -> None:
    """`<output>/world.json`: the world's config and the samples of each `<kind>/<split>` set (written last: a
    world folder with a world.json is complete)."""
    write_json(output / "world.json", {"config": config, "sets": sets})


def merge_world(output_dir: str | Path, count: int | None = None) -> dict[str, dict]:
    """Merge the parts of every set of a world written by parts (`write_world(part=...)`) and write world.json;
    returns {"<kind>/<split>": merged index}."""
    from datamodules.parts import merge_parts, part_sets

    output = Path(output_dir)
    merged = {folder.relative_to(output).as_posix(): merge_parts(folder, count) for folder in part_sets(output)}
    if not merged:
        raise FileNotFoundError(f"no world parts to merge under {output} (no <kind>/<split>/parts folders)")
    configs = [index["world"] for index in merged.values()]
    if any(c != configs[0] for c in configs):
        raise ValueError(f"the sets under {output} were generated with different world configs")
    write_world_summary(output, configs[0], {name: index["num_samples"] for name, index in merged.items()})
    return merged


def world_dir(data_dir: str | Path, config: Any = None) -> Path:
    """The folder of a world: `<data_dir>/shapes_world-<hash of its config>`."""
    from datamodules.synthetic import WorldConfig

    config = config if isinstance(config, WorldConfig) else WorldConfig(**(config or {}))
    digest = hashlib.sha1(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
    return Path(data_dir) / f"shapes_world-{digest}"


def ensure_world(data_dir: str | Path, config: Any = None, workers: int = 0, progress: bool = True) -> Path:
    """The world's folder under data_dir, generated first if absent (written to a temp folder, then renamed)."""
    target = world_dir(data_dir, config)
    if (target / "world.json").is_file():
        return target
    temporary = target.with_name(f"{target.name}.tmp{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    if target.exists():  # an unfinished world (no world.json) from an interrupted run
        shutil.rmtree(target, ignore_errors=True)
    write_world(temporary, config, workers=workers, progress=progress)
    try:
        os.replace(temporary, target)
    except OSError:  # another process finished first
        shutil.rmtree(temporary, ignore_errors=True)
        if not (target / "world.json").is_file():
            raise
    return target
