"""Shard files: a shard spec -> tar URLs (local paths, brace lists, folders, pipe:, http(s)), checks and sample
counts before training, and reading one tar shard as samples.

A spec is a local path, a brace list "a-{000..009}.tar", "::"-joined patterns, a list of those, "pipe:cmd", an
http(s):// URL (read via curl) or a folder with an index.json (its shards, else its *.tar files in name order).
Reading keeps only media/text/json/npz members (READ_EXTENSIONS): shard data is never unpickled.
"""

from __future__ import annotations

import json
import os
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

from datamodules.memory import MemoryLRU

# Members whose last extension is in this set are read; everything else (pyd, pickle, pth, ...) is skipped
# unread, so shard data is never unpickled.
READ_EXTENSIONS = frozenset({"mp4", "webm", "mov", "mkv", "jpg", "jpeg", "png", "wav", "flac", "txt", "json", "npz"})


# ----------------------------------------------------------------------------------------------------------------
# shard lists


def is_local(url: str) -> bool:
    """True for plain paths and file: URLs (not pipe:, http:, s3:, ...)."""
    if url.startswith("pipe:"):
        return False
    scheme = urlparse(url).scheme
    return scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt")


def local_path(url: str) -> Path:
    """The file of a local shard URL (a plain path, or a file: URL)."""
    return Path(urlparse(url).path if url.startswith("file:") else url)


def expand_shards(spec: str | Path | Sequence[str | Path]) -> list[str]:
    """Shard URLs from a brace pattern ("d/shard-{000000..000009}.tar"), "::"-joined patterns, a list, or a
    folder (its index.json's shards, else its *.tar files in name order)."""
    if isinstance(spec, str | Path):
        spec = [spec]
    urls: list[str] = []
    for item in spec:
        item = str(item)
        if is_local(item) and local_path(item).is_dir():
            folder = local_path(item)
            index = folder / "index.json"
            if index.is_file():
                urls += [str(folder / s["name"]) for s in json.loads(index.read_text())["shards"]]
            else:
                urls += [str(p) for p in sorted(folder.glob("*.tar"))]
            if not urls:
                raise FileNotFoundError(f"no shards (*.tar or index.json) in folder {folder}")
            continue
        urls += expand_urls(item)
    if not urls:
        raise ValueError(f"no shards in {spec!r}")
    return urls


def check_shards(urls: Sequence[str]) -> None:
    """Fail before training if a local shard is missing (remote and pipe: URLs are checked when read)."""
    missing = [u for u in urls if is_local(u) and not local_path(u).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"shard not found: {missing[0]}{more}")


def shard_sample_counts(urls: Sequence[str]) -> list[int] | None:
    """Samples per shard, from the index.json beside local shards or by listing the tars; None if a shard is
    remote."""
    indexes: dict[Path, dict[str, int]] = {}
    counts = []
    for url in urls:
        if not is_local(url):
            return None
        path = local_path(url)
        if path.parent not in indexes:
            index = path.parent / "index.json"
            shards = json.loads(index.read_text())["shards"] if index.is_file() else []
            indexes[path.parent] = {s["name"]: int(s["num_samples"]) for s in shards}
        if path.name in indexes[path.parent]:
            counts.append(indexes[path.parent][path.name])
            continue
        keys = set()
        try:
            with tarfile.open(path) as tar:
                for name in tar.getnames():
                    prefix, _ = base_plus_ext(name)
                    if prefix:
                        keys.add(prefix)
        except (tarfile.TarError, OSError, EOFError):
            pass
        counts.append(len(keys))
    return counts


def count_samples(urls: Sequence[str]) -> int | None:
    """Total samples of a shard list (see `shard_sample_counts`); None if unknown."""
    counts = shard_sample_counts(urls)
    return None if counts is None else sum(counts)


# ----------------------------------------------------------------------------------------------------------------
# reading one shard


class ShardReadError(RuntimeError):
    """A shard could not be opened or its tar stream broke off (truncated or corrupt)."""

    def __init__(self, url: str, key: str | None, detail: str) -> None:
        super().__init__(f"shard {url}: {detail}" + (f" (at sample {key})" if key else ""))
        self.url, self.key, self.detail = url, key, detail


def read_shard(url: str) -> Iterator[dict[str, Any]]:
    """Samples of one tar shard: {"__key__", "__url__", ext: bytes, ...} for consecutive members sharing a key.

    Members whose last extension is not in READ_EXTENSIONS are skipped unread. A broken stream raises
    ShardReadError after the complete samples before the break were yielded (the sample being read is lost).
    """
    current: dict[str, Any] | None = None
    try:
        stream = gopen(url[5:] if url.startswith("file:") else url, "rb")
    except Exception as exc:  # noqa: BLE001 - any opener failure (missing file, bad scheme) is a shard error
        raise ShardReadError(url, None, f"cannot open ({exc})") from exc
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                tar.members = []  # streaming mode keeps every TarInfo otherwise
                if not member.isreg():
                    continue
                prefix, suffix = base_plus_ext(member.name)
                if prefix is None or os.path.basename(prefix).startswith("__"):
                    continue
                suffix = suffix.lower()
                if current is None or current["__key__"] != prefix:
                    if current is not None:
                        yield current
                    current = {"__key__": prefix, "__url__": url}
                if suffix.rsplit(".", 1)[-1] in READ_EXTENSIONS:
                    handle = tar.extractfile(member)
                    current[suffix] = handle.read() if handle is not None else b""
        if current is not None:
            yield current
    except (tarfile.TarError, OSError, EOFError, zlib.error, ValueError) as exc:
        raise ShardReadError(url, current["__key__"] if current else None, f"truncated or corrupt tar ({exc})") from exc
    finally:
        try:
            stream.close()
        except Exception:  # noqa: BLE001 - a pipe that exited non-zero; the read error (if any) is reported
            pass


class ShardCache(MemoryLRU):
    """Whole shards' samples (their members' bytes) kept in memory (`memory.MemoryLRU`), up to `max_mb`. A small
    world read for many epochs is then read from disk once: re-reading the tars cost the quickstart ~30 ms a batch
    of 32 clips, 60% of its loader's time. A shard is kept only when read to its end without error; a cut-off or
    broken read is read again. Samples come back as new dicts of the same (immutable) bytes, so what a reader adds
    to one does not stay."""

    def read(self, url: str) -> Iterator[dict[str, Any]]:
        """`read_shard(url)`, from memory after the first complete read."""
        kept = self.get(url)
        if kept is not None:
            for sample in kept:
                yield dict(sample)
            return
        samples, size = [], 0
        for sample in read_shard(url):
            samples.append(dict(sample))
            size += sum(len(v) for v in sample.values() if isinstance(v, bytes))
            yield sample
        self.put(url, samples, size)
