"""Write WebDataset shards from a folder of media, or generate the synthetic shapes world.

    python experiments/make_shards.py input=DIR output=DIR [maxcount=1000] [maxsize=1GB] [metadata=FILE]
                                      [missing_caption=skip|empty|fail]
    python experiments/make_shards.py synthetic=true output=DIR [world.seed=0] [world.scenes=[256,32]] [workers=2]

Folder mode: videos (mp4, mov, webm, mkv), images (jpg, png) and audio (wav, flac) under DIR, captions from
a `.txt` beside each file or from metadata.csv / metadata.jsonl (columns `file` and `caption`), are probed
and written as `shard-%06d.tar` + `index.json` (schema: datamodules/write_shards.py). Videos are decoded to the
last frame. Files that cannot be read or decoded are skipped; a sample without a caption is skipped
(missing_caption=skip, the default), written with an empty caption (empty) or stops the writer (fail). The
summary at the end counts every skipped file by reason and lists each with why. Synthetic mode writes the shapes world
(`<output>/<kind>/<split>/`, kinds: scenes, images, identities, edits, stickers; options: WorldConfig).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from omegaconf import OmegaConf  # noqa: E402

from datamodules.shard_datamodule import plain  # noqa: E402
from datamodules.write_shards import folder_to_shards, write_world  # noqa: E402

USAGE = __doc__.split("\n\n")[1]
KEYS = {"input", "output", "maxcount", "maxsize", "metadata", "synthetic", "world", "kinds", "workers", "progress",
        "missing_caption"}


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
    progress = bool(args.get("progress", True))
    if args.get("synthetic"):
        root = write_world(args["output"], args.get("world") or {}, kinds=args.get("kinds"),
                           workers=int(args.get("workers", 0)), progress=progress)
        print((root / "world.json").read_text())
        return 0
    if "input" not in args:
        print(f"input=DIR is required (or synthetic=true)\n{USAGE}", file=sys.stderr)
        return 2
    try:
        report = folder_to_shards(args["input"], args["output"], maxcount=int(args.get("maxcount", 1000)),
                                  maxsize=args.get("maxsize", "1GB"), metadata=args.get("metadata"),
                                  progress=progress, missing_caption=str(args.get("missing_caption", "skip")))
    except (ValueError, FileNotFoundError) as exc:  # the user's input: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(report.summary())
    print(f"index: {Path(args['output']) / 'index.json'}")
    return 0 if report.index["num_samples"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
