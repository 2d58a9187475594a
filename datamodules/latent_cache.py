"""The TAE latent-cache format, in one place: its writer (`encode_shards`, the code of the TAE's `task=encode`, and
`encode_cache`, which `datamodules.latents.LatentDataModule` calls when a cache is absent) and its reader.

Layout: `<cache>/<split>/shard-%06d.tar` + `index.json` per split (written by `datamodules.write_shards.ShardSink`),
plus `<cache>/cache.json` when `encode_cache` wrote it (TAE checkpoint, samples per split, source shards, options).

A sample, under its source's key:
  `latent.npz`  "latent" [C, T', h, w] (float32 or float16; the posterior mean), "logvar" when kept; written with
                np.savez, read with `np.load(allow_pickle=False)` (never unpickled)
  `txt`         the caption as it was
  `json`        the source's metadata plus "latent": {shape, frames, height, width, fps} (the pixel clip it encodes)
  and the raw members named in `keep` (e.g. "wav").

index.json adds "latent": {format, member, tae (the TAE's config), temporal_factor, spatial_factor,
channel_mean, channel_std (per channel, over every position of every sample's posterior mean), channel_count,
channel_sum, channel_sum_squares (the float64 sums they come from), dtype, tiled, source}. The reader binds a generator's latent normalisation to channel_mean / channel_std and checks its codec
against tae and the factors.

The encoder is the TAE (`lightning_modules.nn.tae.TAE`), taken as any module with its interface: `encode(x)` and
`encode_tiled(x, tile)` returning a posterior with `.mean` and `.logvar`, and `config`, `temporal_factor`,
`spatial_factor`. It is passed in, so this floor never imports the networks.

By parts (`datamodules.parts`): `task=encode` with part=K parts=N (or RANK / WORLD_SIZE, a SLURM array) encodes
the part's range of each split's source shards into `<cache>/<split>/parts/<part>/`; `python
experiments/make_shards.py merge=true output=<cache>` then writes each split's index.json, the statistics
combined from the parts' sums (`merge_latent_entries`): equal to one pass to float64 rounding.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import zipfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange
from webdataset.tariterators import base_plus_ext

from datamodules.media import MediaDecodeError
from datamodules.parts import PARTS_DIR, Part
from datamodules.shard_datamodule import plain
from datamodules.shards import ShardReadError, is_local, read_shard
from datamodules.sources import SkipSample
from datamodules.write_shards import INDEX, ShardSink

LATENT_FORMAT = "mediagen-latents/1"
LATENT_MEMBER = "latent.npz"
CACHE_INFO = "cache.json"
LATENT_DTYPES = ("float32", "float16")


# ----------------------------------------------------------------------------------------------------------------
# one sample


def latent_bytes(mean: torch.Tensor, logvar: torch.Tensor | None = None, dtype: str = "float32") -> bytes:
    """One sample's latent `[C, T', h, w]` (and log-variance) as `latent.npz` bytes (np.savez, no pickles)."""
    if dtype not in LATENT_DTYPES:
        raise ValueError(f"latent_cache.dtype={dtype!r}; choose float32 or float16")
    arrays = {"latent": mean.detach().cpu().to(getattr(torch, dtype)).numpy()}
    if logvar is not None:
        arrays["logvar"] = logvar.detach().cpu().to(getattr(torch, dtype)).numpy()
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def read_latent_arrays(data: bytes) -> dict[str, np.ndarray]:
    """`latent.npz` bytes -> {"latent": float32 [C, T', h, w], "logvar" (if stored)}; never unpickles.

    Raises SkipSample("bad_latent") for anything that is not a readable npz of finite float arrays of 4 dims."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, AttributeError) as exc:
        raise SkipSample("bad_latent", f"unreadable {LATENT_MEMBER} ({type(exc).__name__}: {exc})") from exc
    latent = arrays.get("latent")
    if latent is None:
        raise SkipSample("bad_latent", f"{LATENT_MEMBER} has no 'latent' array (has {sorted(arrays)})")
    for name, array in arrays.items():
        if array.dtype.kind != "f" or array.ndim != 4 or array.shape != latent.shape:
            raise SkipSample("bad_latent", f"{name}: expected float [C, T', h, w] like 'latent', got {array.dtype} "
                                           f"{list(array.shape)}")
        if not np.isfinite(array).all():
            raise SkipSample("bad_latent", f"{name} has non-finite values")
    return {name: array.astype(np.float32, copy=False) for name, array in arrays.items()}


def latent_json(shape: Sequence[int], frames: int, height: int, width: int, fps: float) -> dict[str, Any]:
    """The json's "latent" entry of a sample: its latent shape and the pixel clip it encodes."""
    return {"shape": list(shape), "frames": int(frames), "height": int(height), "width": int(width), "fps": float(fps)}


def json_latent_shape(meta: dict) -> tuple[int, ...] | None:
    """The [C, T', h, w] the sample's json records (meta["latent"]["shape"]), or None."""
    shape = (meta.get("latent") or {}).get("shape") if isinstance(meta.get("latent"), dict) else None
    if isinstance(shape, list) and len(shape) == 4 and all(isinstance(s, int) and s > 0 for s in shape):
        return tuple(shape)
    return None


def read_latent_json(meta: dict, shape: Sequence[int], factors: tuple[int, int] | None = None) -> dict[str, Any]:
    """The json's "latent" entry with `shape` and a float "fps" (0 for images), its pixel frames, height and
    width completed from the TAE's (temporal, spatial) `factors` where the json lacks them."""
    info = dict(meta.get("latent") or {}) if isinstance(meta.get("latent"), dict) else {}
    info["shape"] = list(shape)
    if factors is not None:
        temporal, spatial = factors
        info.setdefault("frames", 1 if shape[1] == 1 else shape[1] * temporal)
        info.setdefault("height", shape[2] * spatial)
        info.setdefault("width", shape[3] * spatial)
    fps = info.get("fps", meta.get("fps") if shape[1] > 1 else 0.0)
    info["fps"] = float(fps or 0.0)
    return info


# ----------------------------------------------------------------------------------------------------------------
# index.json's "latent" entry


class ChannelStatistics:
    """Per-channel mean and standard deviation of latents [B, C, T', h, w] over every position, accumulated batch
    by batch as the count of positions and float64 sums of values and squares. Sums add exactly up to float64
    rounding, so the statistics of parts (`add`, `from_entry`) equal those of one pass over all their latents."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.total_squares: torch.Tensor | None = None
        self.count = 0

    def update(self, latents: torch.Tensor) -> None:
        per_channel = rearrange(latents, "b c t h w -> c (b t h w)").double()
        self.total = per_channel.sum(1) + (self.total if self.total is not None else 0)
        self.total_squares = per_channel.pow(2).sum(1) + (self.total_squares if self.total_squares is not None else 0)
        self.count += per_channel.shape[1]

    def add(self, other: ChannelStatistics) -> None:
        """Take in the statistics of other latents (another part of the same cache)."""
        if other.count == 0:
            return
        if self.count and len(self.total) != len(other.total):
            raise ValueError(f"latent statistics of {len(self.total)} and {len(other.total)} channels cannot be combined")
        self.total = other.total + (self.total if self.total is not None else 0)
        self.total_squares = other.total_squares + (self.total_squares if self.total_squares is not None else 0)
        self.count += other.count

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean [C], std [C]) in float64; needs at least one update."""
        mean = self.total / self.count
        std = (self.total_squares / self.count - mean.pow(2)).clamp_min(0).sqrt()
        return mean, std

    def entry(self) -> dict[str, Any]:
        """The index.json fields: channel_mean, channel_std, and the sums they come from (channel_count,
        channel_sum, channel_sum_squares) for combining parts; empty lists when nothing was counted."""
        if self.count == 0:
            return {"channel_mean": [], "channel_std": [], "channel_count": 0, "channel_sum": [],
                    "channel_sum_squares": []}
        mean, std = self.mean_std()
        return {"channel_mean": mean.tolist(), "channel_std": std.tolist(), "channel_count": self.count,
                "channel_sum": self.total.tolist(), "channel_sum_squares": self.total_squares.tolist()}

    @classmethod
    def from_entry(cls, entry: dict) -> ChannelStatistics:
        """The statistics recorded by `entry()` in an index.json's "latent" entry."""
        if "channel_count" not in entry:
            raise ValueError("the index.json's latent entry has no channel_count / channel_sum (written before "
                             "caches could be merged): re-encode the parts")
        statistics = cls()
        if entry["channel_count"]:
            statistics.count = int(entry["channel_count"])
            statistics.total = torch.tensor(entry["channel_sum"], dtype=torch.float64)
            statistics.total_squares = torch.tensor(entry["channel_sum_squares"], dtype=torch.float64)
        return statistics


def index_latent_entry(encoder: torch.nn.Module, statistics: ChannelStatistics, dtype: str, tiled: bool,
                       urls: Sequence[str]) -> dict[str, Any]:
    """index.json's "latent" entry: the format, the TAE's config and factors, the per-channel statistics."""
    return {
        "format": LATENT_FORMAT, "member": LATENT_MEMBER, "tae": encoder.config,
        "temporal_factor": encoder.temporal_factor, "spatial_factor": encoder.spatial_factor,
        **statistics.entry(), "dtype": dtype, "tiled": tiled, "source": list(urls),
    }  # fmt: skip


def merge_latent_entries(entries: list[dict]) -> dict[str, Any]:
    """The "latent" entry of a cache's parts (`datamodules.parts.merge_parts`) as one: the same TAE and options
    in every part, the per-channel statistics combined from the parts' sums, the source shards in part order."""
    statistics = ChannelStatistics()
    for entry in entries:
        statistics.add(ChannelStatistics.from_entry(entry))
    if statistics.count == 0:
        raise ValueError("no part of the latent cache encoded any sample")
    fixed = ("format", "member", "tae", "temporal_factor", "spatial_factor", "dtype", "tiled")
    for name in fixed:
        if any(entry.get(name) != entries[0].get(name) for entry in entries[1:]):
            raise ValueError(f"the parts of the latent cache differ in latent.{name}: were they encoded with "
                             "different TAEs or options? Re-encode the odd parts")
    return {**{name: entries[0].get(name) for name in fixed}, **statistics.entry(),
            "source": [url for entry in entries for url in entry.get("source", [])]}


def latent_factors(index: dict) -> tuple[int, int] | None:
    """The TAE's (temporal, spatial) factors recorded in an index.json, or None."""
    info = index.get("latent") or {}
    if info.get("temporal_factor") and info.get("spatial_factor"):
        return int(info["temporal_factor"]), int(info["spatial_factor"])
    return None


def channel_statistics(index: dict) -> tuple[list[float], list[float]] | None:
    """The per-channel (mean, std) recorded in an index.json, or None."""
    info = index.get("latent") or {}
    if not info.get("channel_mean") or not info.get("channel_std"):
        return None
    return info["channel_mean"], info["channel_std"]


def encoder_config(index: dict) -> dict | None:
    """The config of the TAE that encoded the cache, as recorded in an index.json, or None."""
    return (index.get("latent") or {}).get("tae") or None


# ----------------------------------------------------------------------------------------------------------------
# reading a cache's description


def cache_index(urls: Sequence[str]) -> dict:
    """The index.json of the cache of the first local shard of `urls` ({} for remote shards or none): the one
    beside it, or for a shard in a part's folder (`<split>/parts/<part>/`) the merged index of `<split>` when
    there is one (its statistics are those of all parts)."""
    for url in urls:
        if is_local(url):
            folder = Path(url.removeprefix("file:")).parent
            merged = folder.parent.parent / INDEX
            if folder.parent.name == PARTS_DIR and merged.is_file():
                return json.loads(merged.read_text())
            index = folder / INDEX
            return json.loads(index.read_text()) if index.is_file() else {}
    return {}


def scan_shapes(urls: Sequence[str]) -> Counter | None:
    """Latent shapes of every sample of local shards (from the json members; the npz where a json lacks one),
    or None when a shard is remote. Unreadable members and shards are left to the stream, which counts them."""
    shapes: Counter = Counter()
    for url in urls:
        if not is_local(url):
            return None
        try:
            with tarfile.open(url.removeprefix("file:")) as tar:
                members: dict[str, dict[str, tarfile.TarInfo]] = {}
                for member in tar.getmembers():
                    prefix, suffix = base_plus_ext(member.name)
                    if prefix and member.isreg():
                        members.setdefault(prefix, {})[suffix] = member
                for parts in members.values():
                    if LATENT_MEMBER not in parts:
                        continue
                    shape = None
                    if "json" in parts:
                        try:
                            shape = json_latent_shape(json.loads(tar.extractfile(parts["json"]).read()))
                        except (ValueError, UnicodeDecodeError, AttributeError):
                            shape = None
                    if shape is None:
                        try:
                            shape = tuple(read_latent_arrays(tar.extractfile(parts[LATENT_MEMBER]).read())["latent"].shape)
                        except (SkipSample, AttributeError):
                            continue
                    shapes[shape] += 1
        except (tarfile.TarError, OSError, EOFError):
            continue
    return shapes


def is_cache(folder: str | Path) -> bool:
    """A finished cache: its train split has an index.json."""
    return (Path(folder) / "train" / INDEX).is_file()


def read_cache_info(folder: str | Path) -> dict:
    """The cache.json of a cache folder ({} when it has none: e.g. written by task=encode)."""
    path = Path(folder) / CACHE_INFO
    return json.loads(path.read_text()) if path.is_file() else {}


# ----------------------------------------------------------------------------------------------------------------
# writing a cache


@torch.no_grad()
def encode_shards(
    net: torch.nn.Module,
    urls: list[str],
    handler: Any,
    output: str | Path,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    tiled: bool = True,
    tile: int = 4,
    dtype: str = "float32",
    keep_logvar: bool = False,
    keep: list[str] | tuple[str, ...] = (),
    maxcount: int = 1000,
    part: Part | None = None,
) -> dict:
    """Encode every sample of `urls` (in order, once) with the TAE `net` into latent shards at `output`; returns
    the index.

    Each sample is read with `datamodules.shards.read_shard`, bucketed and decoded by `handler` (a
    `datamodules.samples` handler in evaluation mode: centre crop, clip from 0 s), batched per bucket and
    encoded (posterior mean; `encode_tiled` when `tiled`). Written with `datamodules.write_shards.ShardSink`
    under the same key, as the module docstring lays out (`latent.npz` with "logvar" if `keep_logvar`, `txt`,
    `json`, and the raw members named in `keep`). Unreadable samples are skipped and listed with their reason.

    With `part` (`datamodules.parts.Part`) only the part's range of `urls` is encoded (the shard is the unit: have
    at least as many source shards as parts), the index records "part", and a part with nothing to encode writes
    an empty index; the parts merge with `datamodules.parts.merge_parts(..., combine={"latent":
    merge_latent_entries})`, their statistics combined exactly.
    """
    urls = part.take(urls) if part is not None else list(urls)
    was_training = net.training
    net.eval().to(device)
    sink = ShardSink(output, maxcount=maxcount)
    skipped: list[dict] = []
    pending: dict[str, list[tuple[dict, dict]]] = {}
    statistics = ChannelStatistics()
    rng = np.random.default_rng(0)  # unused by evaluation-mode handlers (no random crops or starts)

    def flush(name: str) -> None:
        group = pending.pop(name, [])
        if not group:
            return
        video = torch.stack([item["video"] for _, item in group]).to(device)
        posterior = net.encode_tiled(video, tile) if tiled else net.encode(video)
        mean = posterior.mean.float()
        statistics.update(mean)
        for i, (sample, item) in enumerate(group):
            meta = dict(item.get("meta") or {})
            meta["latent"] = latent_json(mean.shape[1:], video.shape[2], video.shape[3], video.shape[4],
                                         item.get("fps", 0.0))
            logvar = posterior.logvar[i] if keep_logvar and posterior.logvar is not None else None
            record = {"__key__": sample["__key__"], LATENT_MEMBER: latent_bytes(mean[i], logvar, dtype), "json": meta}
            if sample.get("txt") is not None:
                record["txt"] = sample["txt"]
            record.update({ext: sample[ext] for ext in keep if ext in sample})
            sink.write(record)

    try:
        for url in urls:
            try:
                for sample in read_shard(url):
                    try:
                        bucket = handler.bucket(sample)
                        item = handler.decode(sample, bucket, rng)
                    except (SkipSample, MediaDecodeError) as exc:
                        skipped.append({"key": sample["__key__"], "shard": url, "reason": str(exc)})
                        continue
                    pending.setdefault(bucket.name, []).append((sample, item))
                    if len(pending[bucket.name]) >= batch_size:
                        flush(bucket.name)
            except ShardReadError as exc:
                skipped.append({"key": exc.key, "shard": url, "reason": exc.detail})
        for name in list(pending):
            flush(name)
    finally:
        net.train(was_training)
    if statistics.count == 0 and part is None:
        raise ValueError(f"encode_shards: no sample of {urls[:3]}... could be encoded; skipped: {skipped[:5]}")
    extra = {"part": {"index": part.index, "count": part.count}} if part is not None else {}
    return sink.close(skipped=skipped, latent=index_latent_entry(net, statistics, dtype, tiled, urls), **extra)


def encode_cache(net: torch.nn.Module, source: Any, output: str | Path, splits: Sequence[str] = ("train", "val"),
                 device: torch.device | str = "cpu", max_shards: int | None = None, checkpoint: str | None = None,
                 **options: Any) -> dict[str, dict]:
    """Encode the `splits` of the shard datamodule `source` (e.g. a `VideoDataModule`) with the TAE `net` into
    `<output>/<split>/` (`encode_shards`, with its `options`: batch_size, tiled, tile, dtype, keep_logvar, keep,
    maxcount); `max_shards` encodes only the first shards of each split. Written to a temporary folder renamed to
    `output` when every split is done, with `cache.json` (TAE checkpoint, source shards, options). Returns
    {split: index}."""
    output = Path(output)
    if output.exists():
        raise FileExistsError(f"latent cache folder {output} exists but is not a finished cache (no "
                              "train/index.json; an interrupted encode?): delete it, or point data.cache_dir elsewhere")
    source.prepare_data()
    source.setup("encode")
    handler = source.sources(train=False)[0].handler  # evaluation mode: centre crop, clips from 0 s
    temporary = output.with_name(f"{output.name}.tmp{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    indexes = {}
    try:
        for split in splits:
            urls = source.urls.get(split)
            if not urls:
                raise ValueError(f"the source datamodule has no {split!r} shards to encode")
            urls = urls[:max_shards] if max_shards else urls
            print(f"[latents] encoding {split}: {len(urls)} shards -> {output / split}")
            indexes[split] = encode_shards(net, list(urls), handler, temporary / split, device=device, **options)
        info = {"tae_checkpoint": checkpoint, "splits": {s: indexes[s]["num_samples"] for s in splits},
                "source": {s: list(source.urls.get(s) or []) for s in splits}, "options": plain(options)}
        (temporary / CACHE_INFO).write_text(json.dumps(info, indent=1))
        output.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(temporary, output)
        except OSError:  # another process finished first
            if not is_cache(output):
                raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return indexes
