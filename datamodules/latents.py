"""`LatentDataModule`: text-to-video batches from a TAE latent cache, streamed like every other shard set.

The cache (written by `experiment=tae_tiny task=encode`, or by `encode_cache` when absent, see below) is
`<cache_dir>/<split>/shard-*.tar` + index.json per split; its format (sample members, index.json's "latent"
entry with the TAE's config, factors and per-channel mean / std) is `datamodules.latent_cache`.

Batches: "latent" float32 [B, C, T', h, w], "text" list[str], "fps" float32 [B] (the clip's sampled rate; 0 for
images), "meta" list[dict] (the json; "latent" always has frames, height, width, which `video_gen` reads to
name the pixel shape it decodes to), "key" list[str]. No "video": `lightning_modules.video_gen` trains on
"latent" directly (`to_latent`), decodes generated latents with its codec, and logs only generated media for
latent batches (no "real" clip: the cache holds none, and a TAE reconstruction would not be the real clip).

Everything else is the shard stream through `ShardDataModule`: resampled shards with a fixed epoch length,
node/worker split, seeded shuffles, resume exact to the sample, corrupt samples skipped and counted
(data/skipped/<reason>: "bad_latent" for an unreadable, mis-shaped or non-finite `latent.npz`, "missing_latent",
"no_caption", "bad_json"), `max_bad_fraction`. `latent.npz` is read with `np.load(allow_pickle=False)`.

Buckets (`LatentBuckets`): one per latent shape C x T' x h x w (the encoder's aspect/duration buckets), named
"CxT'xhxw". The shapes are found in setup by reading the json members of local shards (remote shards: buckets
open as samples arrive). Batch size per bucket: `batch_sizes[name]`, else with `scale_batch_size`
floor(batch_size * V_max / V) capped at `max_batch_size` (default 4 * batch_size), V = C T' h w, so the largest
bucket gets `batch_size` (as `samples.BucketTable` does for pixels), else `batch_size`.

Caption dropout: `caption_dropout` (training only, seeded per sample, so resumable). Leave it 0 with
`video_gen`, which drops captions itself at `model.text_dropout` (in `training_prompts`); both would compound.
`sample_posterior` draws z = mean + exp(logvar / 2)·ε per training sample when the cache kept "logvar".

Normalisation (`normalize`, default on): in `setup`, the module's `latent_mean` / `latent_std` buffers are set
to the cache's per-channel statistics (index.json of the training split), after checking that the module's
codec matches the cache (latent channels; TAE config and factors for a TAE codec). They are buffers, so they
travel in the generator's checkpoints (`task=sample` from a checkpoint uses the values it was trained with).

Encoding when absent (`prepare_data`, once per node): with the default shards (`<cache_dir>/train`) missing and a
`source` shard datamodule given (the pixels to encode, e.g. tae_tiny's data), the splits are encoded with the
module's codec TAE (`encode_cache`: a temporary folder renamed when complete, plus `cache.json` naming the
TAE checkpoint). A codec without trained weights (`lightning_modules.latent_codec.tae_codec` under
`trainer.fast_dev_run` when no checkpoint exists) never writes `cache_dir`: a fast_dev_run then encodes the
first shard of each split into `<run dir>/latents_untrained`, a wiring check only.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datamodules.latent_cache import (
    LATENT_MEMBER,
    cache_index,
    channel_statistics,
    encode_cache,
    encoder_config,
    is_cache,
    json_latent_shape,
    latent_factors,
    read_cache_info,
    read_latent_arrays,
    read_latent_json,
    scan_shapes,
)
from datamodules.samples import read_meta, read_text, stack
from datamodules.shard_datamodule import ShardDataModule, plain
from datamodules.shards import expand_shards
from datamodules.sources import Bucket, SkipSample, Source

UNTRAINED_DIR = "latents_untrained"
_UNKNOWN = "unknown"  # a codec without a `checkpoint` attribute (e.g. TAECodec built directly): assumed trained


# ----------------------------------------------------------------------------------------------------------------
# buckets and the sample handler


class LatentBuckets:
    """One bucket per latent shape (see the module docstring); `buckets` maps shape -> Bucket."""

    def __init__(self, shapes: Iterable[Sequence[int]] = (), batch_size: int = 8,
                 batch_sizes: dict[str, int] | None = None, scale_batch_size: bool = True,
                 max_batch_size: int | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.batch_sizes = int(batch_size), dict(batch_sizes or {})
        self.scale_batch_size, self.cap = scale_batch_size, int(max_batch_size or 4 * batch_size)
        known = sorted({tuple(int(s) for s in shape) for shape in shapes})
        self.largest = max((math.prod(s) for s in known), default=None)
        self.buckets: dict[tuple[int, ...], Bucket] = {}
        for shape in known:
            self.get(shape)
        unknown = set(self.batch_sizes) - {b.name for b in self.buckets.values()}
        if known and unknown:
            raise ValueError(f"batch_sizes names unknown buckets {sorted(unknown)}; the cache's buckets are "
                             f"{sorted(b.name for b in self.buckets.values())}")

    @staticmethod
    def name(shape: Sequence[int]) -> str:
        return "x".join(str(int(s)) for s in shape)

    def get(self, shape: Sequence[int]) -> Bucket:
        """The bucket of a latent shape [C, T', h, w] (opened on first sight when not found in setup)."""
        shape = tuple(int(s) for s in shape)
        if shape not in self.buckets:
            name, size = self.name(shape), self.batch_size
            if self.scale_batch_size and self.largest:
                size = min(self.cap, max(1, math.floor(self.batch_size * self.largest / math.prod(shape))))
            self.buckets[shape] = Bucket(name, int(self.batch_sizes.get(name, size)), height=shape[2], width=shape[3],
                                         frames=shape[1])
        return self.buckets[shape]


class LatentHandler:
    """The stream's handler (`datamodules.sources.SampleHandler`) of latent samples: bucket from the json, load
    the npz, collate.

    Args:
        table: the `LatentBuckets`.
        train: caption dropout and posterior sampling only in training.
        factors: (temporal, spatial) factors of the TAE, to complete a json without latent frames/height/width.
    """

    def __init__(self, table: LatentBuckets, train: bool = True, require_text: bool = True,
                 caption_dropout: float = 0.0, sample_posterior: bool = False,
                 factors: tuple[int, int] | None = None) -> None:
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"caption_dropout={caption_dropout} must be in [0, 1)")
        self.table, self.train, self.require_text = table, train, require_text
        self.caption_dropout, self.sample_posterior, self.factors = caption_dropout, sample_posterior, factors

    def _shape(self, sample: dict[str, Any], meta: dict) -> tuple[int, ...]:
        if sample.get(LATENT_MEMBER) is None:
            raise SkipSample("missing_latent", f"no {LATENT_MEMBER}")
        return json_latent_shape(meta) or tuple(read_latent_arrays(sample[LATENT_MEMBER])["latent"].shape)

    def bucket(self, sample: dict[str, Any]) -> Bucket:
        meta = read_meta(sample)
        read_text(sample, self.require_text)
        return self.table.get(self._shape(sample, meta))

    def load(self, sample: dict[str, Any], bucket: Bucket, rng: np.random.Generator) -> dict[str, Any]:
        meta = read_meta(sample)
        text = read_text(sample, self.require_text)
        shape = self._shape(sample, meta)
        arrays = read_latent_arrays(sample[LATENT_MEMBER])
        latent = arrays["latent"]
        if tuple(latent.shape) != shape or bucket.name != self.table.name(shape):
            raise SkipSample("bad_latent", f"latent {list(latent.shape)} but the json says {list(shape)}")
        if self.train and self.sample_posterior and "logvar" in arrays:
            noise = rng.standard_normal(latent.shape, dtype=np.float32)
            latent = latent + np.exp(0.5 * arrays["logvar"]) * noise
        if self.train and self.caption_dropout > 0 and rng.uniform() < self.caption_dropout:
            text = ""
        info = read_latent_json(meta, shape, self.factors)
        meta = {**meta, "latent": info}
        return {"latent": torch.from_numpy(np.ascontiguousarray(latent, dtype=np.float32)), "text": text,
                "fps": info["fps"], "meta": meta}

    def collate(self, items: list[dict[str, Any]], bucket: Bucket) -> dict[str, Any]:
        return {
            "latent": stack([i["latent"] for i in items]),
            "text": [i["text"] for i in items],
            "fps": torch.tensor([i["fps"] for i in items], dtype=torch.float32),
            "meta": [i["meta"] for i in items],
        }


# ----------------------------------------------------------------------------------------------------------------
# the datamodule


class LatentDataModule(ShardDataModule):
    """Text-to-video batches from a TAE latent cache (see the module docstring).

    Args:
        cache_dir: the cache (`task=encode`'s `latent_cache.output_dir`): `<cache_dir>/train`, `<cache_dir>/val`.
        shards / val_shards: explicit latent shards instead (anything `expand_shards` takes); with `shards` set
            nothing is encoded and `val_shards=None` means no validation.
        source: a shard datamodule (e.g. `VideoDataModule`) whose splits are encoded with the module's TAE when
            the cache is absent; None: a missing cache is an error naming the command that makes one.
        encode: options of `encode_shards` (batch_size, tiled, tile, dtype, keep_logvar, keep, maxcount) and
            `splits` (default train, val) for that encoding.
        normalize: set the module's latent_mean / latent_std to the cache's per-channel statistics in setup.
        caption_dropout: probability of an empty caption per training sample (0 with video_gen: it drops itself).
        sample_posterior: train on z ~ q(z|x) when the cache kept "logvar" (else on the stored mean).
        **kwargs: the streaming options of `ShardDataModule` (batch_size, batch_sizes, scale_batch_size,
            max_batch_size, num_workers, seed, epoch_batches, val_batches, shuffle_buffer, max_bad_fraction, ...).
    """

    world_kind = "latents"

    def __init__(
        self,
        cache_dir: str | Path | None = None,
        shards: Any = None,
        val_shards: Any = None,
        source: Any = None,
        encode: dict | None = None,
        normalize: bool = True,
        caption_dropout: float = 0.0,
        sample_posterior: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(shards, val_shards, **kwargs)
        if cache_dir is None and self.shards is None:
            raise ValueError("data.cache_dir (a latent cache folder) or data.shards (latent shards) is required")
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"data.caption_dropout={caption_dropout} must be in [0, 1)")
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.source, self.encode_options = source, plain(encode) or {}
        self.normalize, self.caption_dropout, self.sample_posterior = normalize, caption_dropout, sample_posterior
        self.index: dict = {}
        self.table: LatentBuckets | None = None

    # ------------------------------------------------------------------------------------------------ the cache

    def _codec(self) -> Any:
        module = self.trainer.lightning_module if self.trainer is not None else None
        return getattr(module, "codec", None) if module is not None else None

    def _codec_is_trained(self) -> bool:
        return getattr(self._codec(), "checkpoint", _UNKNOWN) is not None

    def cache_root(self) -> Path | None:
        """The cache this run reads: `cache_dir`, or under a fast_dev_run with an untrained TAE and no cache
        there, `<run dir>/latents_untrained` (never written into cache_dir)."""
        if self.cache_dir is None or is_cache(self.cache_dir) or self._codec_is_trained():
            return self.cache_dir
        trainer = self.trainer
        if trainer is not None and trainer.fast_dev_run:
            return Path(trainer.default_root_dir) / UNTRAINED_DIR
        return self.cache_dir

    def prepare_data(self) -> None:
        if self.shards is None:
            self.ensure_cache()

    def ensure_cache(self) -> Path:
        """The cache folder, encoded first with the module's TAE codec if absent (see the module docstring)."""
        root = self.cache_root()
        assert root is not None
        if is_cache(root):
            return root
        command = "python experiments/run.py experiment=tae_tiny task=encode ckpt_path=last"
        if self.source is None:
            raise FileNotFoundError(f"no latent cache at {root} (no train/index.json) and no data.source to encode "
                                    f"one from: make it with `{command}` (or set data.cache_dir / data.shards)")
        codec = self._codec()
        net = getattr(codec, "net", None)
        if net is None or not hasattr(net, "encode"):
            raise ValueError(f"no latent cache at {root}: encoding one needs the module's codec to be a TAE "
                             f"(model/codec=tae_cache), got {type(codec).__name__}; or make it with `{command}`")
        untrained = not self._codec_is_trained()
        if untrained and root == self.cache_dir:
            raise ValueError(f"no latent cache at {root}, and the codec's TAE has no trained weights "
                             "(model.codec.checkpoint): refusing to write a cache from a random TAE; train one "
                             "with `python experiments/run.py experiment=tae_tiny`")
        options = dict(self.encode_options)
        splits = options.pop("splits", ["train", "val"])
        if untrained:
            warnings.warn(f"fast_dev_run: encoding a throwaway cache with the untrained TAE into {root}",
                          stacklevel=2)
        device = self.trainer.strategy.root_device if self.trainer is not None else "cpu"
        encode_cache(net, self.source, root, splits, device=device, max_shards=1 if untrained else None,
                     checkpoint=getattr(codec, "checkpoint", None), **options)
        return root

    # ---------------------------------------------------------------------------------------------------- setup

    def resolve(self, spec: Any, kind: str, split: str) -> list[str] | None:
        if spec is not None:
            return expand_shards(spec)
        if self.shards is not None:
            return None  # explicit training shards and no val_shards: no validation
        root = self.cache_root()
        if (root / split / "index.json").is_file():
            return expand_shards(root / split)
        if split == "train":
            raise FileNotFoundError(f"no latent cache at {root} (no train/index.json): make it with `python "
                                    "experiments/run.py experiment=tae_tiny task=encode ckpt_path=last`, or give "
                                    "data.source to encode it here")
        return None

    def setup(self, stage: str | None = None) -> None:
        if self.urls:
            return
        super().setup(stage)
        urls = self.urls["train"] or []
        self.index = cache_index(urls)
        shapes = scan_shapes([*urls, *(self.urls.get("val") or [])])
        self.table = LatentBuckets(shapes or (), self.batch_size, self.batch_sizes, self.scale_batch_size,
                                   self.max_batch_size)
        if shapes is not None and not shapes:
            raise ValueError(f"no latent samples ({LATENT_MEMBER}) in the shards {urls[:3]}...")
        self._check_and_bind(shapes)

    def factors(self) -> tuple[int, int] | None:
        return latent_factors(self.index)

    def _check_and_bind(self, shapes: Counter | None) -> None:
        """Check the module's codec against the cache; set its latent_mean / latent_std (`normalize`)."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        codec = getattr(module, "codec", None)
        if module is None or codec is None:
            return
        if "probe" in (getattr(module, "evaluators", None) or {}) and self.source is None:
            warnings.warn("model.evaluators.probe is set: the probe trains on pixel clips (\"video\"), which a latent "
                          "cache has none of and this cache has no `source` datamodule to read them from, so the test "
                          "loop would fail; set data.source or model.evaluators.probe=null", stacklevel=2)
        statistics = channel_statistics(self.index)
        channels = {s[0] for s in shapes or ()} | ({len(statistics[0])} if statistics else set())
        if channels and channels != {int(codec.latent_channels)}:
            raise ValueError(f"the latent cache has {sorted(channels)} channels but the model's codec has "
                             f"{codec.latent_channels} (model.net.in_channels must match too)")
        net = getattr(codec, "net", None)
        stored = encoder_config(self.index)
        if stored and net is not None and getattr(net, "config", None) is not None:
            ours = json.loads(json.dumps(net.config))
            diff = sorted(k for k in set(stored) | set(ours) if stored.get(k) != ours.get(k))
            if diff:
                raise ValueError("the model's codec TAE differs from the one that encoded the cache in "
                                 + ", ".join(f"{k} (cache {stored.get(k)}, codec {ours.get(k)})" for k in diff))
        recorded = self._cache_info().get("tae_checkpoint")
        ours_ckpt = getattr(codec, "checkpoint", None)
        if recorded and ours_ckpt and Path(recorded).resolve() != Path(ours_ckpt).resolve():
            warnings.warn(f"the latent cache was encoded with the TAE {recorded}, but the codec decodes with "
                          f"{ours_ckpt}: samples decode correctly only if they hold the same weights", stacklevel=2)
        if not self.normalize or statistics is None:
            return
        mean, std = getattr(module, "latent_mean", None), getattr(module, "latent_std", None)
        if not isinstance(mean, torch.Tensor) or not isinstance(std, torch.Tensor):
            return
        channel_mean, channel_std = statistics
        with torch.no_grad():
            mean.copy_(torch.tensor(channel_mean, dtype=mean.dtype).view_as(mean))
            std.copy_(torch.tensor(channel_std, dtype=std.dtype).clamp_min(1e-3).view_as(std))
        print(f"[latents] model latent_mean / latent_std <- the cache's per-channel statistics: mean "
              f"{[round(v, 3) for v in channel_mean]}, std {[round(v, 3) for v in channel_std]}")

    def _cache_info(self) -> dict:
        root = self.cache_root() if self.shards is None else None
        return read_cache_info(root) if root is not None else {}

    # -------------------------------------------------------------------------------------------------- sources

    def sources(self, train: bool) -> list[Source]:
        if self.table is None:
            self.setup("fit" if train else "validate")
        split = "train" if train else "val"
        table = self.table
        if not train and self.val_batch_size is not None:
            table = LatentBuckets(table.buckets.keys(), *self.batching(False), self.scale_batch_size,
                                  self.max_batch_size)
        handler = LatentHandler(table, train=train, require_text=self.require_text,
                                caption_dropout=self.caption_dropout, sample_posterior=self.sample_posterior,
                                factors=self.factors())
        return [Source(self.urls[split], handler, 1.0, "latent")]
