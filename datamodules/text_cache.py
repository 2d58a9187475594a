"""The text-embedding cache of a frozen text encoder: each sample's caption encoded once, written as shards.

Layout: `<cache>/shard-%06d.tar` + `index.json` (`datamodules.write_shards.ShardSink`), or by parts
`<cache>/parts/<part>/...` merged into `<cache>/index.json` (`datamodules.parts`). Written by
`python experiments/make_shards.py text_encoder=DIR shards=SPEC output=DIR` (see there).

A sample, under its source's key:
  `text.npz`  "tokens" [L, D] (float32 or float16): the encoder's output at the prompt's L real tokens (mask
              True; padding left out); written with np.savez, read with `np.load(allow_pickle=False)`
  `txt`       the prompt encoded: the caption (stripped, as the datamodules read it), or with `fps_prompt` the
              prompt the Text conditioner forms from it ("FPS-<fps> <caption>" for videos, see `clip_timing`)
  `json`      the source's metadata plus "text_embedding": {length L, dim D}
and one more sample, key `NULL_KEY`, json {"kind": "null_prompt"}: the null prompt "" (classifier-free guidance's
unconditional branch), written by a whole run or by part 0 of a run by parts.

index.json adds "text_embedding": {format, member, encoder (what the caller says of it: class, path, max_length,
...), dim, dtype, fps_in_text (the prompts were formed with `fps_prompt`), fps (the rate given for raw videos,
None = each json's), null_key, source (the source shards)}. Samples without a caption (or with a json that does
not parse) are skipped and listed with their reason.

`read_text_cache` reads a cache back as prompt -> tokens (`lightning_modules.nn.text.CachedTextEncoder` serves
them to the Text conditioner in place of the live encoder).

The encoder is any callable with `lightning_modules.nn.text.TextEncoder`'s interface (texts -> (tokens [B, L, D],
mask bool [B, L])) and a `dim`; it is passed in, so this floor never imports the networks.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datamodules.parts import Part
from datamodules.samples import read_meta, read_text
from datamodules.shards import ShardReadError, expand_shards, read_shard
from datamodules.sources import SkipSample
from datamodules.write_shards import ShardSink

TEXT_FORMAT = "mediagen-text-embeddings/1"
TEXT_MEMBER = "text.npz"
TEXT_DTYPES = ("float32", "float16")
NULL_KEY = "_null_prompt_"  # the sample of the null prompt "" (keys starting "__" are not read back)

def text_embedding_bytes(tokens: torch.Tensor, dtype: str = "float32") -> bytes:
    """One caption's embedding [L, D] as `text.npz` bytes (np.savez, no pickles)."""
    if dtype not in TEXT_DTYPES:
        raise ValueError(f"text embedding dtype={dtype!r}; choose float32 or float16")
    buffer = io.BytesIO()
    np.savez(buffer, tokens=tokens.detach().cpu().to(getattr(torch, dtype)).numpy())
    return buffer.getvalue()


def read_text_embedding(data: bytes) -> np.ndarray:
    """`text.npz` bytes -> float32 [L, D]; never unpickles. SkipSample("bad_text_embedding") for anything that is
    not an npz with a finite float "tokens" array of 2 dims."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            tokens = archive["tokens"]
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise SkipSample("bad_text_embedding", f"unreadable {TEXT_MEMBER} ({type(exc).__name__}: {exc})") from exc
    if tokens.dtype.kind != "f" or tokens.ndim != 2 or not np.isfinite(tokens).all():
        raise SkipSample("bad_text_embedding", f"expected finite float [L, D], got {tokens.dtype} {list(tokens.shape)}")
    return tokens.astype(np.float32, copy=False)


def clip_timing(meta: dict, fps: float | None = None) -> tuple[float, int]:
    """(fps, frames) of the clip a datamodule gives the Text conditioner for a sample, from its json: a latent
    cache's "latent" entry (the clip it encodes, exactly); else a video's num_frames and rate, the rate replaced
    by `fps` when given (the video datamodule's `fps`, at which it samples clips); (0, 1) for images and audio.

    Only "is it a video" (frames > 1 and fps > 0) and the rate shape the prompt. A video trained in one-frame
    buckets would be a video here but an image to the conditioner: its prompt then misses the cache."""
    latent = meta.get("latent")
    if isinstance(latent, dict):
        shape = latent.get("shape") or [0, 1]
        frames = int(latent.get("frames") or shape[1])
        return (float(latent.get("fps", meta.get("fps")) or 0.0) if frames > 1 else 0.0), frames
    frames = int(meta.get("num_frames") or 1)
    if frames <= 1:
        return 0.0, 1
    return float(fps or meta.get("fps") or 0.0), frames


@torch.no_grad()
def encode_texts(encoder: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]], urls: Sequence[str],
                 output: str | Path, describe: dict[str, Any], batch_size: int = 64, dtype: str = "float32",
                 maxcount: int = 1000, part: Part | None = None,
                 fps_prompt: Callable[[str, float, int], str] | None = None, fps: float | None = None) -> dict:
    """Encode the prompt of every sample of `urls` (in order, once), and the null prompt "", with the frozen
    `encoder` into shards at `output`; returns the index. `describe` (json) says which encoder it was; it goes
    to index.json.

    `fps_prompt` (caption, fps, frames) -> prompt is the Text conditioner's own function
    (`lightning_modules.conditioning.text.fps_prompt`, passed in: this floor does not import the conditioners),
    called with the sample's `clip_timing(meta, fps)`: the cache then holds the prompts a conditioner with
    fps_in_text=true encodes. None: the captions as they are (fps_in_text=false).

    With `part` only the part's range of `urls` is encoded (part 0 adds the null prompt), the index records
    "part", and an empty part writes an empty index; the parts merge with `datamodules.parts.merge_parts(...,
    combine={"text_embedding": merge_text_entries})`.
    """
    if dtype not in TEXT_DTYPES:
        raise ValueError(f"text embedding dtype={dtype!r}; choose float32 or float16")
    urls = part.take(urls) if part is not None else list(urls)
    sink = ShardSink(output, maxcount=maxcount)
    skipped: list[dict] = []
    # The null prompt first, once per cache: guidance dropout replaces any prompt by it.
    pending: list[tuple[str, str, dict]] = [(NULL_KEY, "", {"kind": "null_prompt"})]
    if part is not None and part.index != 0:
        pending.clear()

    def flush() -> None:
        if not pending:
            return
        tokens, mask = encoder([text for _, text, _ in pending])
        for i, (key, text, meta) in enumerate(pending):
            real = tokens[i][mask[i].to(tokens.device)]
            meta = {**meta, "text_embedding": {"length": int(real.shape[0]), "dim": int(real.shape[1])}}
            sink.write({"__key__": key, TEXT_MEMBER: text_embedding_bytes(real, dtype), "txt": text, "json": meta})
        pending.clear()

    for url in urls:
        try:
            for sample in read_shard(url):
                try:
                    meta = read_meta(sample)
                    text = read_text(sample, required=True)
                except SkipSample as exc:
                    skipped.append({"key": sample["__key__"], "shard": url, "reason": exc.reason, "detail": exc.detail})
                    continue
                if fps_prompt is not None:
                    text = fps_prompt(text, *clip_timing(meta, fps))
                pending.append((sample["__key__"], text, meta))
                if len(pending) >= batch_size:
                    flush()
        except ShardReadError as exc:
            skipped.append({"key": exc.key, "shard": url, "reason": "bad_shard", "detail": exc.detail})
    flush()
    if not sink.keys - {NULL_KEY} and part is None:
        raise ValueError(f"encode_texts: no caption of {list(urls)[:3]}... could be encoded; skipped: {skipped[:5]}")
    entry = {"format": TEXT_FORMAT, "member": TEXT_MEMBER, "encoder": describe, "dim": int(encoder.dim),
             "dtype": dtype, "fps_in_text": fps_prompt is not None, "fps": None if fps is None else float(fps),
             "null_key": NULL_KEY, "source": list(urls)}
    extra = {"part": {"index": part.index, "count": part.count}} if part is not None else {}
    return sink.close(skipped=skipped, text_embedding=entry, **extra)


def merge_text_entries(entries: list[dict]) -> dict[str, Any]:
    """The "text_embedding" entry of a cache's parts as one: the same encoder and options in every part, the
    source shards in part order."""
    fixed = ("format", "member", "encoder", "dim", "dtype", "fps_in_text", "fps", "null_key")
    for name in fixed:
        if any(entry.get(name) != entries[0].get(name) for entry in entries[1:]):
            raise ValueError(f"the parts of the text-embedding cache differ in text_embedding.{name}: were they "
                             "encoded with different encoders or options? Re-encode the odd parts")
    return {**{name: entries[0].get(name) for name in fixed},
            "source": [url for entry in entries for url in entry.get("source", [])]}


@dataclass
class TextCache:
    """A text-embedding cache read back: index.json's "text_embedding" entry, each prompt's tokens [L, D] (in the
    cache's dtype; a prompt stored twice keeps its first embedding) and the samples that could not be read."""

    folder: Path
    entry: dict[str, Any]
    tokens: dict[str, np.ndarray]
    skipped: list[dict] = field(default_factory=list)


def read_text_cache(folder: str | Path) -> TextCache:
    """Every prompt of the cache at `folder` (its index.json: a whole run's, or the merge of its parts) with its
    tokens. Never unpickles. A sample that cannot be read is skipped and listed (its prompt is then a miss); a
    folder that is not a text-embedding cache is a ValueError / FileNotFoundError that says what to run."""
    folder = Path(folder)
    index_path = folder / "index.json"
    if not index_path.is_file():
        hint = (f"its parts are not merged: python experiments/make_shards.py merge=true output={folder}"
                if (folder / "parts").is_dir() else "write it with python experiments/make_shards.py text_encoder=DIR "
                f"shards=SPEC output={folder}")
        raise FileNotFoundError(f"no text-embedding cache at {folder} (no index.json): {hint}")
    entry = json.loads(index_path.read_text()).get("text_embedding")
    if not isinstance(entry, dict) or entry.get("format") != TEXT_FORMAT:
        raise ValueError(f"{index_path} is not a text-embedding cache (no text_embedding entry of format "
                         f"{TEXT_FORMAT})")
    dtype = np.dtype(entry.get("dtype", "float32"))
    tokens: dict[str, np.ndarray] = {}
    skipped: list[dict] = []
    for url in expand_shards(folder):
        try:
            for sample in read_shard(url):
                try:
                    if TEXT_MEMBER not in sample or "txt" not in sample:
                        raise SkipSample("bad_text_embedding", f"no {TEXT_MEMBER} or txt")
                    # As written: the prompt exactly (stripped captions, and "" for the null prompt).
                    prompt = sample["txt"].decode("utf-8")
                    embedding = read_text_embedding(sample[TEXT_MEMBER])
                except SkipSample as exc:
                    skipped.append({"key": sample["__key__"], "shard": url, "reason": exc.reason, "detail": exc.detail})
                    continue
                except UnicodeDecodeError as exc:
                    skipped.append({"key": sample["__key__"], "shard": url, "reason": "bad_text", "detail": str(exc)})
                    continue
                tokens.setdefault(prompt, embedding.astype(dtype, copy=False))
        except ShardReadError as exc:
            skipped.append({"key": exc.key, "shard": url, "reason": "bad_shard", "detail": exc.detail})
    return TextCache(folder, entry, tokens, skipped)
