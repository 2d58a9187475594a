"""AVID's inpainting measured on held-out clips of the world, beside a floor, and a frame grid for the README.

    python experiments/benchmarks/avid_inpaint.py [run=<avid_structure run or checkpoint>] [--clips 16]

The newest `experiment=avid_structure` checkpoint (EMA weights when present) inpaints held-out clips of its world,
each played forward and back to 20 frames (2.5 training windows), with the presets' masks: retexture and object
swap get the exact mask of the clip's object (it moves with the object), uncrop a border of 1/4 of the frame on
the left and right; the prompt is the clip's caption. Per preset, averaged over the clips (pixels in [-1, 1]):

    fill_error        mean |output - original| inside the mask (the original is what the caption describes)
    fill_error_floor  the same for the floor: the mask filled with the mean colour of the pixels outside it
    background_error  mean |generated - source| outside the mask before the paste (0 after it, by construction)
    flicker           mean frame-to-frame change inside the mask, beside the original's (`flicker_source`)
    seam_jump         the change at window boundaries over the change elsewhere, with overlap 4 (Temporal
                      MultiDiffusion) and with overlap 0 (independent windows), beside the original's
    colour_drift      change of the filled region's mean colour from the first to the last frame

Prints a table, writes experiments/benchmarks/results/avid_inpaint.json and avid_grid.png (per clip: original,
masked, inpainted; first 10 frames).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from experiments.quickstart_grid import frames_row, load_run, run_checkpoint  # noqa: E402
from lightning_modules.generative.multidiffusion import window_spans  # noqa: E402
from lightning_modules.inpainting import PRESETS, composite, inpainting_metrics  # noqa: E402

RESULTS = ROOT / "experiments" / "benchmarks" / "results"
FRAMES, WINDOW = 20, 8


def ping_pong(video: torch.Tensor, frames: int) -> torch.Tensor:
    """[B, C, T, ...] played forward and back until `frames` long (motion stays continuous)."""
    t = video.shape[2]
    order = list(range(t)) + list(range(t - 2, 0, -1))
    index = torch.tensor([order[i % len(order)] for i in range(frames)])
    return video[:, :, index]


def preset_masks(labels: torch.Tensor, preset: str, height: int, width: int) -> torch.Tensor:
    """[B, 1, T, H, W]: the largest object of each clip (tracked) or, for uncrop, a left and right border."""
    if preset == "uncrop":
        mask = torch.zeros(labels.shape[0], 1, labels.shape[1], height, width)
        mask[..., : width // 4] = 1.0
        mask[..., width - width // 4:] = 1.0
        return mask
    masks = []
    for clip in labels:
        ids, counts = clip[0].unique(return_counts=True)
        keep = ids > 0
        chosen = ids[keep][counts[keep].argmax()] if keep.any() else None
        masks.append((clip == chosen).float() if chosen is not None else torch.zeros_like(clip, dtype=torch.float32))
    return torch.stack(masks)[:, None]


def mean_fill(source: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The floor: the mask filled with the mean colour of each clip's pixels outside it."""
    outside = (1 - mask).expand_as(source)
    colour = (source * outside).sum(dim=(2, 3, 4), keepdim=True) / outside.sum(dim=(2, 3, 4), keepdim=True).clamp_min(1)
    return composite(colour.expand_as(source), source, mask)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=16)
    args, rest = parser.parse_known_args(argv)
    run = next((a.split("=", 1)[1] for a in rest if a.startswith("run=")), None)
    base = Path(run) if run else Path(os.environ.get("OUTPUT_DIR", ROOT / "outputs")) / "avid_structure"
    ckpt, overrides = run_checkpoint(str(base))
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    module, ema, batch = load_run(ckpt, [*overrides, f"data.batch_size={args.clips}"], "avid_inpaint")
    n = min(args.clips, len(batch["text"]))
    source = ping_pong(batch["video"][:n].float(), FRAMES)
    labels = ping_pong(batch["labels"][:n, None], FRAMES)[:, 0]
    _, _, _, height, width = source.shape
    starts = [s for s, _ in window_spans(FRAMES, WINDOW, 4)][1:]
    starts_naive = [s for s, _ in window_spans(FRAMES, WINDOW, 0)][1:]
    rows, grid = {}, []
    for preset in PRESETS:
        mask = preset_masks(labels, preset, height, width)
        module.net.structure_weight = PRESETS[preset]
        request = {"video": source, "mask": mask, "text": list(batch["text"][:n]), "fps": batch["fps"][:n]}
        outputs = {}
        for overlap in (4, 0):
            module.sampler.window, module.sampler.overlap = WINDOW, overlap
            outputs[overlap] = module.generate(request, FRAMES, height, width, seed=module.sampler.seed).cpu()
        per_clip = [inpainting_metrics(outputs[4][i:i + 1], source[i:i + 1], mask[i:i + 1], starts) for i in range(n)]
        naive = [inpainting_metrics(outputs[0][i:i + 1], source[i:i + 1], mask[i:i + 1], starts_naive)
                 for i in range(n)]
        real = [inpainting_metrics(source[i:i + 1], source[i:i + 1], mask[i:i + 1], starts) for i in range(n)]
        inside = mask.expand_as(source) > 0.5
        out = composite(outputs[4], source, mask)
        mean = lambda items, key: float(np.mean([m[key] for m in items if key in m]))  # noqa: E731
        rows[preset] = {
            "w_s": PRESETS[preset], "clips": n, "mask_fraction": float(mask.mean()),
            "fill_error": float((out - source).abs()[inside].mean()),
            "fill_error_floor": float((mean_fill(source, mask) - source).abs()[inside].mean()),
            "background_error": mean(per_clip, "background_error"),
            "flicker": mean(per_clip, "temporal_flicker"), "flicker_source": mean(per_clip, "temporal_flicker_source"),
            "seam_jump": mean(per_clip, "seam_jump"), "seam_jump_no_overlap": mean(naive, "seam_jump"),
            "seam_jump_source": mean(real, "seam_jump"), "colour_drift": mean(per_clip, "colour_drift"),
            "colour_drift_source": mean(real, "colour_drift"),
        }
        masked = source * (1 - mask) + mask * torch.tensor([1.0, -1.0, 1.0]).view(1, 3, 1, 1, 1)  # magenta hole
        for i in range(min(3, n)):
            grid += [frames_row(v[i, :, :10], 4) for v in (source, masked, out)]
    print(f"{'preset':<12}{'w_s':>5}{'fill err':>10}{'floor':>8}{'bg err':>8}{'flicker':>9}{'(real)':>8}"
          f"{'seam':>7}{'no ovl':>8}{'(real)':>8}{'drift':>7}")
    for preset, r in rows.items():
        print(f"{preset:<12}{r['w_s']:>5.1f}{r['fill_error']:>10.3f}{r['fill_error_floor']:>8.3f}"
              f"{r['background_error']:>8.3f}{r['flicker']:>9.3f}{r['flicker_source']:>8.3f}{r['seam_jump']:>7.2f}"
              f"{r['seam_jump_no_overlap']:>8.2f}{r['seam_jump_source']:>8.2f}{r['colour_drift']:>7.3f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"checkpoint": str(ckpt), "ema": ema, "frames": FRAMES, "window": WINDOW, "rows": rows}
    (RESULTS / "avid_inpaint.json").write_text(json.dumps(result, indent=1))
    Image.fromarray(np.concatenate(grid, axis=0)).save(RESULTS / "avid_grid.png")
    return result


if __name__ == "__main__":
    main()
