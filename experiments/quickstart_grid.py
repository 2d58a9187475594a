"""A PNG frame grid of a finished quickstart run: its samples beside the real clips of the same held-out prompts.

    python experiments/quickstart_grid.py [run=<run folder or checkpoint>] [--prompts 8] [--output PNG] [key=value ...]

`run` defaults to the newest quickstart run with a `last.ckpt` under $OUTPUT_DIR (default outputs/). The model is
rebuilt from the run's own overrides (<run dir>/.hydra/overrides.yaml), loaded with the checkpoint's EMA weights,
(further key=value overrides, e.g. the sampler's, come after them) and sampled for the first held-out prompts with the noise of the test loop's first batch (seed = the sampler's),
so the grid shows the clips the test metrics scored. Each row is one prompt: its real clip's frames, then the
sample's, each frame scaled up `--scale` times (nearest), with the caption above. Default output:
experiments/benchmarks/results/quickstart_grid.png.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

import hydra  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from einops import rearrange  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from callbacks.ema import load_ema_weights  # noqa: E402
from experiments.compose import compose_config  # noqa: E402
from lightning_modules.checkpoint_io import newest_checkpoint, read_module_state  # noqa: E402

RUN_ONLY = ("ckpt_path=", "task=", "run_name=", "test_after_fit=")  # overrides that do not shape the model


def run_checkpoint(location: str | None) -> tuple[Path, list[str]]:
    """(checkpoint, the run's overrides) for a run folder, a checkpoint in <run>/checkpoints/, or None (newest)."""
    base = Path(location) if location else Path(os.environ.get("OUTPUT_DIR", ROOT / "outputs")) / "quickstart"
    ckpt = newest_checkpoint(base)
    run_dir = next((p for p in ckpt.parents if (p / ".hydra" / "overrides.yaml").is_file()), None)
    if run_dir is None:
        raise FileNotFoundError(f"{ckpt}: no .hydra/overrides.yaml in a folder above it (a run folder)")
    overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) or []
    # "+key=value" added a key the experiment lacked then; "++" also fits an experiment that has it since
    return ckpt, ["+" + o if o.startswith("+") and not o.startswith("++") else o
                  for o in overrides if not o.startswith(RUN_ONLY)]


def load_run(ckpt: Path, overrides: list[str], job: str) -> tuple[torch.nn.Module, bool, dict, Any]:
    """(the run's module with the checkpoint's weights (EMA when it has them), whether EMA, its first validation
    batch, its datamodule set up for validation), composed from the run's overrides."""
    cfg = compose_config(overrides, Path("/tmp") / job)
    module = hydra.utils.instantiate(cfg.model, _convert_="object")
    module.load_state_dict(read_module_state(ckpt))
    ema = load_ema_weights(module, ckpt)
    module.eval()
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="object")
    datamodule.prepare_data()
    datamodule.setup("validate")
    return module, ema, next(iter(datamodule.val_dataloader())), datamodule


def frames_row(video: torch.Tensor, scale: int) -> np.ndarray:
    """[3, T, H, W] in [-1, 1] → uint8 [H·scale, T·(W·scale + 2), 3]: the frames left to right, 2 px apart."""
    pixels = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    pixels = pixels.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    pixels = torch.nn.functional.pad(pixels, (0, 2), value=255)
    return rearrange(pixels, "c t h w -> h (t w) c").numpy()


def caption_row(text: str, width: int) -> np.ndarray:
    """A white strip [14, width, 3] with `text` written on it: the title of a group of rows."""
    label = Image.new("RGB", (width, 14), "white")
    ImageDraw.Draw(label).text((2, 1), text, fill="black")
    return np.asarray(label)


def tagged_row(name: str, line: np.ndarray, tag_width: int = 110) -> np.ndarray:
    """`line` [H, W, 3] with `name` written in a white column of `tag_width` at its left (wrapped to fit)."""
    tag = Image.new("RGB", (tag_width, line.shape[0]), "white")
    ImageDraw.Draw(tag).multiline_text((2, 2), "\n".join(textwrap.wrap(name, tag_width // 6)), fill="black")
    return np.concatenate([np.asarray(tag), line], axis=1)


def stack_rows(rows: list[np.ndarray]) -> Image.Image:
    """Rows [H_i, W_i, 3] top to bottom, each padded white on the right to the widest."""
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return Image.fromarray(np.concatenate(rows, axis=0))


def grid_image(real: torch.Tensor, sample: torch.Tensor, captions: list[str], scale: int = 4) -> Image.Image:
    """One row per prompt: caption, then real frames | sample frames (real [N, 3, T, H, W], sample alike)."""
    rows = []
    for r, s, caption in zip(real, sample, captions):
        pair = np.concatenate([frames_row(r, scale), np.full((r.shape[2] * scale, 10, 3), 255, np.uint8),
                               frames_row(s, scale)], axis=1)
        rows += [caption_row(textwrap.shorten(caption, 160), pair.shape[1]), pair,
                 np.full((6, pair.shape[1], 3), 255, np.uint8)]
    head = Image.new("RGB", (rows[1].shape[1], 14), "white")
    draw = ImageDraw.Draw(head)
    draw.text((2, 1), "real clip", fill="black")
    draw.text((rows[1].shape[1] // 2 + 5, 1), "sample (same prompt)", fill="black")
    return Image.fromarray(np.concatenate([np.asarray(head), *rows], axis=0))


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--output", default=str(ROOT / "experiments/benchmarks/results/quickstart_grid.png"))
    args, rest = parser.parse_known_args(argv)
    run = next((a.split("=", 1)[1] for a in rest if a.startswith("run=")), None)
    ckpt, overrides = run_checkpoint(run)
    overrides += [a for a in rest if not a.startswith("run=")]
    torch.set_num_threads(1)
    module, ema, batch, _ = load_run(ckpt, overrides, "quickstart_grid")
    n = min(args.prompts, len(batch["text"]))
    part = {k: v[:n] if isinstance(v, torch.Tensor | list | tuple) else v for k, v in batch.items()}
    frames, height, width = part["video"].shape[2:]
    sample = module.generate(part, frames, height, width, seed=module.sampler.seed)
    image = grid_image(part["video"], sample, list(part["text"]), args.scale)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    image.save(output)
    print(f"[quickstart_grid] {n} prompts from {ckpt} ({'EMA' if ema else 'raw'} weights) -> {output}")
    return output


if __name__ == "__main__":
    main()
