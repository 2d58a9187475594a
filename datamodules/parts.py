"""Data preparation by parts: many processes (torchrun ranks, SLURM array tasks, machines) each write a part of a
shard set, and one merge joins them. Only files are shared: no process group is needed.

A part is (index, count), `Part(3, 8)` = "part 3 of 8". `current_part` reads it from explicit keys (`part=K
parts=N`, which win), else torchrun's RANK / WORLD_SIZE, else a SLURM array's SLURM_ARRAY_TASK_ID /
SLURM_ARRAY_TASK_COUNT (relative to SLURM_ARRAY_TASK_MIN, in steps of SLURM_ARRAY_TASK_STEP, so `--array=1-8`
and `--array=0-14:2` work too); None when none is set (one process, no parts).

Assignment: a part takes a contiguous range of the sorted input list, items [n * index // count,
n * (index + 1) // count) (`Part.take`). Contiguous, so that the parts' outputs concatenated in part order are
the single-process output in the same order; the range sizes differ by at most one item.

Layout of a shard set `<output>` written by parts:

    <output>/parts/part-00003-of-00008/shard-000000.tar ... + index.json   (what one part wrote)
    <output>/index.json                                                    (the merge's, over all parts)

A part's index.json is written last and atomically (`datamodules.write_shards.ShardSink`), so it is the part's
"done" marker: `open_part` skips a done part and empties the folder of a part that was killed midway, which is
then redone from scratch. `merge_parts` checks that every part is done and writes one index.json whose shard
names are relative paths into the parts' folders, so every reader of a shard folder (`datamodules.shards`)
reads the merged set unchanged.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from datamodules.write_shards import INDEX, SCHEMA, merge_stats, write_json

PARTS_DIR = "parts"
_PART_NAME = re.compile(r"part-(\d+)-of-(\d+)")
Item = TypeVar("Item")
# index.json keys every part has, merged by merge_parts itself
_MERGED_KEYS = {"format", "num_samples", "num_shards", "shards", "stats", "skipped", "part"}


class MissingPartsError(FileNotFoundError):
    """merge_parts found parts that are not done; the message names them."""


@dataclass(frozen=True)
class Part:
    """Part `index` of `count` (0 <= index < count)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"part {self.index} of {self.count}: a part index must be in 0..count-1 with count >= 1")

    def __str__(self) -> str:
        return f"part {self.index} of {self.count}"

    @property
    def name(self) -> str:
        """The part's folder name, `part-00003-of-00008`."""
        return f"part-{self.index:05d}-of-{self.count:05d}"

    def bounds(self, total: int) -> tuple[int, int]:
        """[start, stop) of this part's contiguous range of `total` items."""
        return total * self.index // self.count, total * (self.index + 1) // self.count

    def take(self, items: Sequence[Item]) -> list[Item]:
        """This part's contiguous range of `items` (already in their deterministic order, e.g. sorted)."""
        start, stop = self.bounds(len(items))
        return list(items[start:stop])


def _integer(value: Any, name: str) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


def current_part(part: Any = None, parts: Any = None, environ: Mapping[str, str] | None = None) -> Part | None:
    """The part this process writes (see the module docstring): explicit `part` and `parts` (both or neither),
    else RANK / WORLD_SIZE, else SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT; None when none is set."""
    env = os.environ if environ is None else environ
    if part is not None or parts is not None:
        if part is None or parts is None:
            raise ValueError(f"part={part} parts={parts}: give both (part K of N parts) or neither")
        source = f"part={part} parts={parts}"
        index, count = _integer(part, "part"), _integer(parts, "parts")
    elif "RANK" in env and "WORLD_SIZE" in env:
        source = f"RANK={env['RANK']} WORLD_SIZE={env['WORLD_SIZE']}"
        index, count = _integer(env["RANK"], "RANK"), _integer(env["WORLD_SIZE"], "WORLD_SIZE")
    elif "SLURM_ARRAY_TASK_ID" in env:
        if "SLURM_ARRAY_TASK_COUNT" not in env:
            raise ValueError("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not; give part=K parts=N")
        task = _integer(env["SLURM_ARRAY_TASK_ID"], "SLURM_ARRAY_TASK_ID")
        first = _integer(env.get("SLURM_ARRAY_TASK_MIN", 0), "SLURM_ARRAY_TASK_MIN")
        step = _integer(env.get("SLURM_ARRAY_TASK_STEP", 1), "SLURM_ARRAY_TASK_STEP")
        count = _integer(env["SLURM_ARRAY_TASK_COUNT"], "SLURM_ARRAY_TASK_COUNT")
        source = (f"SLURM_ARRAY_TASK_ID={task} (min {first}, step {step}) "
                  f"SLURM_ARRAY_TASK_COUNT={count}")
        index = (task - first) // max(step, 1)
    else:
        return None
    try:
        return Part(index, count)
    except ValueError:
        raise ValueError(f"{source}: part {index} of {count} does not exist (the index must be in 0..{count - 1} "
                         "and the count >= 1)") from None


def rank_device(device: str | torch.device) -> torch.device:
    """`device`, but a CUDA device under torchrun is the rank's own GPU, cuda:LOCAL_RANK (modulo the GPUs seen):
    the ranks of a data-preparation run share no process group and would all take cuda:0 otherwise."""
    device = torch.device(device)
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    return device


# ----------------------------------------------------------------------------------------------------------------
# one part's folder


def part_folder(output: str | Path, part: Part) -> Path:
    """`<output>/parts/part-KKKKK-of-NNNNN`."""
    return Path(output) / PARTS_DIR / part.name


def is_done(folder: str | Path) -> bool:
    """A part's folder holds its index.json: the part finished."""
    return (Path(folder) / INDEX).is_file()


def open_part(output: str | Path, part: Part) -> Path | None:
    """The empty folder to write `part` of the shard set `output` into, or None when the part is done already.
    What a killed run of the part left there (shards, no index.json) is removed first."""
    folder = part_folder(output, part)
    if is_done(folder):
        return None
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


# ----------------------------------------------------------------------------------------------------------------
# merging


def part_counts(output: str | Path) -> list[int]:
    """The part counts N of the part folders under `<output>/parts` (one, unless runs with different N met)."""
    folders = (Path(output) / PARTS_DIR).glob("part-*-of-*")
    return sorted({int(m.group(2)) for f in folders if (m := _PART_NAME.fullmatch(f.name))})


def part_sets(output: str | Path) -> list[Path]:
    """The shard sets written by parts at or under `output` (folders with a `parts` subfolder), in name order:
    `output` itself, or e.g. the `<kind>/<split>` sets of a world and the `<split>` sets of a latent cache."""
    output = Path(output)
    return sorted(p.parent for p in output.rglob(PARTS_DIR) if p.is_dir() and part_counts(p.parent))


def _equal_or_concatenated(key: str, values: list[Any]) -> Any:
    """Part indexes' values of `key`: lists are concatenated in part order, other values must agree."""
    if all(isinstance(v, list) for v in values):
        return [item for value in values for item in value]
    if any(v != values[0] for v in values[1:]):
        raise ValueError(f"the parts disagree on index.json's {key!r} ({values[0]!r} vs {values[1]!r}): were they "
                         "written with different options? Rerun the odd parts (delete their folders) and merge again")
    return values[0]


def merge_parts(output: str | Path, count: int | None = None,
                combine: Mapping[str, Callable[[list[Any]], Any]] | None = None) -> dict:
    """Merge the parts of the shard set `output` into `<output>/index.json`; returns the merged index.

    Every part 0..count-1 must be done (else MissingPartsError naming the missing ones); `count` defaults to the
    N of the part folders found. The merged index has the shards of all parts (names relative to `output`, in
    part order), summed sample and shard counts and statistics (`merge_stats`), the parts' skipped records in
    part order, and "parts": N. Every other key is merged by `combine[key]` (a function of the parts' values,
    e.g. `datamodules.latent_cache.merge_latent_entries`), else lists are concatenated and other values must be
    equal in all parts.
    """
    output = Path(output)
    if count is None:
        found = part_counts(output)
        if not found:
            raise MissingPartsError(f"no parts to merge in {output / PARTS_DIR} (no part-K-of-N folders)")
        if len(found) > 1:
            raise ValueError(f"{output / PARTS_DIR} holds parts of runs with different part counts {found}; give "
                             "parts=N, or delete the folders of the other run")
        count = found[0]
    parts = [Part(i, count) for i in range(count)]
    missing = [p for p in parts if not is_done(part_folder(output, p))]
    if missing:
        names = ", ".join(str(p.index) for p in missing)
        raise MissingPartsError(f"cannot merge {output}: {len(missing)} of {count} parts not done (no index.json): "
                                f"part {names}; run them (part=K parts={count}) and merge again")
    indexes = [json.loads((part_folder(output, p) / INDEX).read_text()) for p in parts]
    shards = [{**shard, "name": f"{PARTS_DIR}/{p.name}/{shard['name']}"}
              for p, index in zip(parts, indexes) for shard in index["shards"]]
    merged = {
        "format": SCHEMA,
        "num_samples": sum(index["num_samples"] for index in indexes),
        "num_shards": len(shards),
        "shards": shards,
        "stats": merge_stats([index.get("stats", {}) for index in indexes]),
        "skipped": [record for index in indexes for record in index.get("skipped", [])],
        "parts": count,
    }
    combine = dict(combine or {})
    for key in sorted({k for index in indexes for k in index} - _MERGED_KEYS):
        values = [index.get(key) for index in indexes]
        merged[key] = combine[key](values) if key in combine else _equal_or_concatenated(key, values)
    write_json(output / INDEX, merged)
    return merged


def skipped_by_reason(index: dict) -> Counter:
    """An index's skipped records counted by reason."""
    return Counter(str(record.get("reason")) for record in index.get("skipped", []))
