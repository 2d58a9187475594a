"""The text-embedding cache of a frozen text encoder: each sample's caption encoded once, written as shards.

Layout: `<cache>/shard-%06d.tar` + `index.json` (`datamodules.write_shards.ShardSink`), or by parts
`<cache>/parts/<part>/...` merged into `<cache>/index.json` (`datamodules.parts`). Written by
`python experiments/make_shards.py text_encoder=DIR shards=SPEC output=DIR` (see there).

A sample, under its source's key:
  `text.npz`  "tokens" [L, D] (float32 or float16): the encoder's output at the caption's L real tokens (mask
              True; padding left out); written with np.savez, read with `np.load(allow_pickle=False)`
  `txt`       the caption encoded (stripped, as the datamodules read it)
  `json`      the source's metadata plus "text_embedding": {length L, dim D}

index.json adds "text_embedding": {format, member, encoder (what the caller says of it: class, path, max_length,
...), dim, dtype, source (the source shards)}. Samples without a caption (or with a json that does not parse)
are skipped and listed with their reason.

The encoder is any callable with `lightning_modules.nn.text.TextEncoder`'s interface (texts -> (tokens [B, L, D],
mask bool [B, L])) and a `dim`; it is passed in, so this floor never imports the networks.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datamodules.parts import Part
from datamodules.samples import read_meta, read_text
from datamodules.shards import ShardReadError, read_shard
from datamodules.sources import SkipSample
from datamodules.write_shards import ShardSink

TEXT_FORMAT = "mediagen-text-embeddings/1"
TEXT_MEMBER = "text.npz"
TEXT_DTYPES = ("float32", "float16")

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


@torch.no_grad()
def encode_texts(encoder: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]], urls: Sequence[str],
                 output: str | Path, describe: dict[str, Any], batch_size: int = 64, dtype: str = "float32",
                 maxcount: int = 1000, part: Part | None = None) -> dict:
    """Encode the caption of every sample of `urls` (in order, once) with the frozen `encoder` into shards at
    `output`; returns the index. `describe` (json) says which encoder it was; it goes to index.json.

    With `part` only the part's range of `urls` is encoded, the index records "part", and an empty part writes an
    empty index; the parts merge with `datamodules.parts.merge_parts(..., combine={"text_embedding":
    merge_text_entries})`.
    """
    if dtype not in TEXT_DTYPES:
        raise ValueError(f"text embedding dtype={dtype!r}; choose float32 or float16")
    urls = part.take(urls) if part is not None else list(urls)
    sink = ShardSink(output, maxcount=maxcount)
    skipped: list[dict] = []
    pending: list[tuple[str, str, dict]] = []

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
                pending.append((sample["__key__"], text, meta))
                if len(pending) >= batch_size:
                    flush()
        except ShardReadError as exc:
            skipped.append({"key": exc.key, "shard": url, "reason": "bad_shard", "detail": exc.detail})
    flush()
    if not sink.keys and part is None:
        raise ValueError(f"encode_texts: no caption of {list(urls)[:3]}... could be encoded; skipped: {skipped[:5]}")
    entry = {"format": TEXT_FORMAT, "member": TEXT_MEMBER, "encoder": describe, "dim": int(encoder.dim),
             "dtype": dtype, "source": list(urls)}
    extra = {"part": {"index": part.index, "count": part.count}} if part is not None else {}
    return sink.close(skipped=skipped, text_embedding=entry, **extra)


def merge_text_entries(entries: list[dict]) -> dict[str, Any]:
    """The "text_embedding" entry of a cache's parts as one: the same encoder and options in every part, the
    source shards in part order."""
    fixed = ("format", "member", "encoder", "dim", "dtype")
    for name in fixed:
        if any(entry.get(name) != entries[0].get(name) for entry in entries[1:]):
            raise ValueError(f"the parts of the text-embedding cache differ in text_embedding.{name}: were they "
                             "encoded with different encoders or options? Re-encode the odd parts")
    return {**{name: entries[0].get(name) for name in fixed},
            "source": [url for entry in entries for url in entry.get("source", [])]}
