"""Write WebDataset shards from a folder of media, generate the synthetic shapes world, or cache the text
embeddings of a shard set; by parts on many processes, then merged.

    python experiments/make_shards.py input=DIR output=DIR [maxcount=1000] [maxsize=1GB] [metadata=FILE]
                                      [missing_caption=skip|empty|fail]
    python experiments/make_shards.py synthetic=true output=DIR [world.seed=0] [world.scenes=[256,32]] [workers=2]
    python experiments/make_shards.py text_encoder=DIR shards=SPEC output=DIR [max_length=256] [quoted_only=false]
                                      [fps_in_text=true] [fps=RATE] [batch_size=64] [dtype=float32] [device=cpu]
    python experiments/make_shards.py ... part=K parts=N      (or RANK / WORLD_SIZE, or a SLURM array's task)
    python experiments/make_shards.py merge=true output=DIR [parts=N] [synthetic=true]

Folder mode: videos (mp4, mov, webm, mkv), images (jpg, png) and audio (wav, flac) under DIR, captions from
a `.txt` beside each file or from metadata.csv / metadata.jsonl (columns `file` and `caption`), are probed
and written as `shard-%06d.tar` + `index.json` (schema: datamodules/write_shards.py). Videos are decoded to the
last frame. Files that cannot be read or decoded are skipped; a sample without a caption is skipped
(missing_caption=skip, the default), written with an empty caption (empty) or stops the writer (fail). The
summary at the end counts every skipped file by reason and lists each with why. Synthetic mode writes the shapes world
(`<output>/<kind>/<split>/`, kinds: scenes, images, identities, edits, stickers; options: WorldConfig).
Text mode writes the text-embedding cache of a frozen Hugging Face encoder saved in DIR (HFTextEncoder, nothing
is downloaded): each caption of the shard set SPEC as `text.npz` (schema: datamodules/text_cache.py), as the
prompt the Text conditioner forms from it (fps_in_text=true, its default: "FPS-<fps> <caption>" for videos, at
the json's rate or at fps=RATE, the video datamodule's data.fps; false: the caption alone), and the null prompt
"". Train with it: lightning_modules.nn.text.CachedTextEncoder (its docstring shows the overrides).

By parts (datamodules/parts.py): with part=K parts=N, or under torchrun (RANK, WORLD_SIZE) or a SLURM array
(SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT), a process writes only its contiguous range of the sorted samples
into `<output>/parts/part-K-of-N/` (synthetic: in each `<kind>/<split>/`); a part done before is skipped, a
part killed midway is redone. merge=true checks that all N parts are done and writes `<output>/index.json` over
all of them (every shard set under output: a folder's, a latent cache's splits, a text-embedding cache's;
synthetic=true: the world's sets and world.json).
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from omegaconf import OmegaConf  # noqa: E402

from datamodules.latent_cache import merge_latent_entries  # noqa: E402
from datamodules.parts import (  # noqa: E402
    MissingPartsError,
    Part,
    current_part,
    merge_parts,
    open_part,
    part_folder,
    part_sets,
    rank_device,
    skipped_by_reason,
)
from datamodules.shard_datamodule import plain  # noqa: E402
from datamodules.shards import expand_shards  # noqa: E402
from datamodules.text_cache import encode_texts, merge_text_entries  # noqa: E402
from datamodules.write_shards import folder_to_shards, merge_world, write_world  # noqa: E402

USAGE = __doc__.split("\n\n")[1]
KEYS = {"input", "output", "maxcount", "maxsize", "metadata", "synthetic", "world", "kinds", "workers", "progress",
        "missing_caption", "part", "parts", "merge", "text_encoder", "shards", "max_length", "quoted_only",
        "batch_size", "dtype", "device", "fps_in_text", "fps"}
# index.json entries that the merge combines from the parts' values (other lists are concatenated, other
# values must agree)
COMBINE = {"latent": merge_latent_entries, "text_embedding": merge_text_entries}


def merge(output: Path, count: int | None, synthetic: bool) -> int:
    """Merge the parts of every shard set under `output`; prints one line per set."""
    if synthetic:
        merged = merge_world(output, count)
    else:
        sets = part_sets(output)
        if not sets:
            raise MissingPartsError(f"no parts to merge under {output} (no parts/part-K-of-N folders)")
        merged = {folder.relative_to(output).as_posix(): merge_parts(folder, count, COMBINE) for folder in sets}
    for name, index in merged.items():
        reasons = ", ".join(f"{n} {reason}" for reason, n in skipped_by_reason(index).most_common())
        print(f"{output / name / 'index.json'}: {index['num_samples']} samples in {index['num_shards']} shards of "
              f"{index['parts']} parts" + (f"; skipped {len(index['skipped'])}: {reasons}" if index["skipped"] else ""))
    return 0 if all(index["num_samples"] > 0 for index in merged.values()) else 1


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    bad = [a for a in argv if "=" not in a]
    if bad:
        print(f"arguments are key=value, got {bad}\n{USAGE}", file=sys.stderr)
        return 2
    args = plain(OmegaConf.to_container(OmegaConf.from_dotlist(argv)))
    unknown = set(args) - KEYS
    if unknown:
        print(f"unknown options {sorted(unknown)}; known: {sorted(KEYS)}\n{USAGE}", file=sys.stderr)
        return 2
    if "output" not in args:
        print(f"output=DIR is required\n{USAGE}", file=sys.stderr)
        return 2
    try:
        return write(args)
    except (ValueError, FileNotFoundError) as exc:  # the user's input: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 1


def write(args: dict) -> int:
    """The mode the arguments ask for: a merge, the synthetic world, or a folder (each by parts or whole)."""
    output, progress = Path(args["output"]), bool(args.get("progress", True))
    if args.get("merge"):
        return merge(output, int(args["parts"]) if args.get("parts") is not None else None, bool(args.get("synthetic")))
    part = current_part(args.get("part"), args.get("parts"))
    merge_hint = f"; when every part is done: python experiments/make_shards.py merge=true output={output}"
    if args.get("synthetic"):
        root = write_world(output, args.get("world") or {}, kinds=args.get("kinds"),
                           workers=int(args.get("workers", 0)), progress=progress, part=part)
        print(f"{part} done{merge_hint} synthetic=true" if part else (root / "world.json").read_text())
        return 0
    if args.get("text_encoder"):
        return write_text_embeddings(args, output, part, merge_hint)
    if "input" not in args:
        print(f"input=DIR is required (or synthetic=true, or text_encoder=DIR)\n{USAGE}", file=sys.stderr)
        return 2
    folder = open_part(output, part) if part is not None else output
    if folder is None:
        print(f"{part} already done: {part_folder(output, part) / 'index.json'}")
        return 0
    report = folder_to_shards(args["input"], folder, maxcount=int(args.get("maxcount", 1000)),
                              maxsize=args.get("maxsize", "1GB"), metadata=args.get("metadata"), progress=progress,
                              missing_caption=str(args.get("missing_caption", "skip")), part=part)
    print(report.summary())
    print(f"index: {folder / 'index.json'}" + (merge_hint if part else ""))
    return 0 if report.index["num_samples"] > 0 or part is not None else 1


def write_text_embeddings(args: dict, output: Path, part: Part | None, merge_hint: str) -> int:
    """Text mode: the captions of the shard set `shards` encoded by the frozen encoder in `text_encoder`."""
    from lightning_modules.conditioning.text import Text, fps_prompt
    from lightning_modules.nn.text import HFTextEncoder  # here: only this mode needs transformers

    if "shards" not in args:
        print(f"text_encoder=DIR needs shards=SPEC (the shard set whose captions to encode)\n{USAGE}", file=sys.stderr)
        return 2
    urls = expand_shards(args["shards"])
    folder = open_part(output, part) if part is not None else output
    if folder is None:
        print(f"{part} already done: {part_folder(output, part) / 'index.json'}")
        return 0
    options = {"max_length": int(args.get("max_length", 256)), "quoted_only": bool(args.get("quoted_only", False))}
    encoder = HFTextEncoder(str(args["text_encoder"]), **options).to(rank_device(args.get("device", "cpu")))
    describe = {"class": "HFTextEncoder", "path": str(Path(args["text_encoder"]).resolve()), **options}
    # The conditioner's own default and prompt function: the cache holds what training encodes.
    fps_in_text = bool(args.get("fps_in_text", inspect.signature(Text).parameters["fps_in_text"].default))
    fps = float(args["fps"]) if args.get("fps") is not None else None
    index = encode_texts(encoder, urls, folder, describe, batch_size=int(args.get("batch_size", 64)),
                         dtype=str(args.get("dtype", "float32")), maxcount=int(args.get("maxcount", 1000)), part=part,
                         fps_prompt=fps_prompt if fps_in_text else None, fps=fps)
    print(f"wrote {index['num_samples']} text embeddings in {index['num_shards']} shards"
          + (f"; skipped {len(index['skipped'])}" if index["skipped"] else "") + f"\nindex: {folder / 'index.json'}"
          + (merge_hint if part else ""))
    return 0 if index["num_samples"] > 0 or part is not None else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
