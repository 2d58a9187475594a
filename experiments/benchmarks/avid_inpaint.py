"""AVID's inpainting measured on held-out clips of the world, beside its ceiling and floor, with the paper's
ablations, and a frame grid for the README.

    python experiments/benchmarks/avid_inpaint.py [run=<avid_structure run or checkpoint>] [--clips 8] [--steps 20]

The newest `experiment=avid_structure` checkpoint (EMA weights when present) inpaints held-out clips of its world,
each played forward and back to the length asked (the training window is 8 frames), with the presets' masks:
retexture and object swap get the exact mask of the clip's object (it moves with the object), uncrop a border of
1/4 of the frame on the left and right; the prompt is the clip's caption. Sampling modes:

    per_clip     independent windows of 8 frames (no overlap)
    one_chunk    the whole clip in one pass (the motion modules see every frame)
    tmd          Temporal MultiDiffusion: windows of 8 with an overlap of 4, fused at every step
    tmd_guided   tmd + middle-frame attention guidance (w_a = 0.4, the CLI's default)

Metrics, averaged over the clips (pixels in [-1, 1]; `lightning_modules.inpainting`):

    fill_error        mean |output - original| inside the mask (the original is what the caption describes)
    fill_error_floor  the same for the floor: the mask filled with the mean colour of the pixels outside it
    text_alignment    share of frames whose filled region reads as the prompt's colour (real clip: the ceiling,
                      mean fill: the floor); object masks only
    background_error  mean |generated - source| outside the mask before the paste (0 after it, by construction)
    flicker           mean frame-to-frame change inside the mask (temporal consistency), beside the original's
    seam_jump         the change at window boundaries over the change elsewhere (1: no seam), beside the original's
    colour_drift      change of the filled region's mean colour from the first to the last frame

Sections: the presets (20 frames, tmd_guided); the ablation of the modes at 32 and 64 frames (object swap:
w_s = 0, so that only the temporal mechanism keeps the object); w_a in {0, 0.3, 0.5, 0.8, 1} (tmd, 32 frames);
w_s in {0, 0.5, 1} for retexturing (20 frames); time and peak memory against length for tmd_guided and
one_chunk (one clip; memory: bytes malloc holds above what it held before, sampled after every ResBlock and
spatial transformer). `--sections` reruns some of them and keeps the others from the last results file.
Writes experiments/benchmarks/results/avid_inpaint.json and avid_grid.png (per clip: original, masked, inpainted).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from experiments.benchmarks.parallel_memory import Peak, in_use  # noqa: E402
from experiments.quickstart_grid import frames_row, load_run, run_checkpoint  # noqa: E402
from lightning_modules.generative.multidiffusion import window_spans  # noqa: E402
from lightning_modules.inpainting import (  # noqa: E402
    PRESETS,
    composite,
    fill_colour_alignment,
    inpainting_metrics,
    prompt_colour,
)

RESULTS = ROOT / "experiments" / "benchmarks" / "results"
WINDOW, OVERLAP, W_A = 8, 4, 0.4
SECTIONS = ["presets", "ablation", "w_a", "w_s", "scaling"]
MODES = {"per_clip": (WINDOW, 0, 0.0), "one_chunk": (None, 0, 0.0), "tmd": (WINDOW, OVERLAP, 0.0),
         "tmd_guided": (WINDOW, OVERLAP, W_A)}


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


class Bench:
    """The loaded run and its held-out clips; `inpaint` samples, `measure` scores."""

    def __init__(self, module: torch.nn.Module, batch: dict, clips: int, steps: int) -> None:
        self.module, self.n, self.steps = module, min(clips, len(batch["text"])), steps
        self.clips, self.labels = batch["video"][:self.n].float(), batch["labels"][:self.n]
        self.texts, self.fps = list(batch["text"][:self.n]), batch["fps"][:self.n]

    def task(self, preset: str, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(source, mask) of every clip, `frames` long."""
        source = ping_pong(self.clips, frames)
        labels = ping_pong(self.labels[:, None], frames)[:, 0]
        return source, preset_masks(labels, preset, *source.shape[-2:])

    def inpaint(self, source: torch.Tensor, mask: torch.Tensor, mode: str, w_s: float, w_a: float | None = None,
                clips: slice = slice(None)) -> torch.Tensor:
        window, overlap, default_w_a = MODES[mode]
        sampler = self.module.sampler
        sampler.window, sampler.overlap = (window, overlap) if window and source.shape[2] > window else (None, 0)
        sampler.anchor_weight = default_w_a if w_a is None else w_a
        self.module.net.structure_weight = w_s
        request = {"video": source[clips], "mask": mask[clips], "text": self.texts[clips], "fps": self.fps[clips]}
        return self.module.generate(request, source.shape[2], *source.shape[-2:], steps=self.steps,
                                    seed=sampler.seed).cpu()

    def measure(self, generated: torch.Tensor, source: torch.Tensor, mask: torch.Tensor, mode: str,
                preset: str) -> dict[str, float]:
        frames = source.shape[2]
        window, overlap, _ = MODES[mode]
        starts = [s for s, _ in window_spans(frames, window, overlap)][1:] if window and frames > window else \
            [s for s, _ in window_spans(frames, WINDOW, OVERLAP)][1:]  # one chunk: where tmd's seams would be
        prompts = self.texts if preset != "uncrop" else [None] * self.n
        per_clip = [inpainting_metrics(generated[i:i + 1], source[i:i + 1], mask[i:i + 1], starts, prompts[i])
                    for i in range(self.n)]
        mean = lambda key: float(np.nanmean([m[key] for m in per_clip if key in m])) if any(  # noqa: E731
            key in m for m in per_clip) else float("nan")
        inside = mask.expand_as(source) > 0.5
        out = composite(generated, source, mask)
        return {"fill_error": float((out - source).abs()[inside].mean()), "text_alignment": mean("text_alignment"),
                "background_error": mean("background_error"), "flicker": mean("temporal_flicker"),
                "seam_jump": mean("seam_jump"), "colour_drift": mean("colour_drift")}

    def reference(self, source: torch.Tensor, mask: torch.Tensor, preset: str) -> dict[str, float]:
        """The real clip's values (the ceiling) and the mean-fill floor's fill error and text alignment."""
        real = self.measure(source, source, mask, "tmd", preset)
        floor = mean_fill(source, mask)
        inside = mask.expand_as(source) > 0.5
        colours = [prompt_colour(t) for t in self.texts]
        floor_alignment = [fill_colour_alignment(floor[i:i + 1], mask[i:i + 1], c) for i, c in enumerate(colours)
                           if c is not None and preset != "uncrop"]
        return {**{f"{k}_real": v for k, v in real.items() if k not in ("fill_error", "background_error")},
                "fill_error_floor": float((floor - source).abs()[inside].mean()),
                "text_alignment_floor": float(np.nanmean(floor_alignment)) if floor_alignment else float("nan")}


def scaling(bench: Bench, lengths: list[int]) -> dict[str, dict[int, dict[str, float]]]:
    """Seconds and peak bytes (above the model's) to inpaint one clip of each length, tmd_guided vs one_chunk."""
    peak = Peak()
    blocks = [m for m in bench.module.net.modules() if type(m).__name__ in ("ResBlock", "SpatialTransformer")]
    hooks = [m.register_forward_hook(peak.sample) for m in blocks]
    out: dict[str, dict[int, dict[str, float]]] = {}
    try:
        for mode in ("tmd_guided", "one_chunk"):
            bench.inpaint(*bench.task("object_swap", lengths[0]), mode, 0.0, clips=slice(0, 1))  # warm-up
            out[mode] = {}
            for frames in lengths:
                source, mask = bench.task("object_swap", frames)
                base = in_use()
                peak.value = base
                start = time.perf_counter()
                bench.inpaint(source, mask, mode, 0.0, clips=slice(0, 1))
                out[mode][frames] = {"seconds": time.perf_counter() - start, "peak_mib": (peak.value - base) / 2**20}
    finally:
        for hook in hooks:
            hook.remove()
    return out


def fmt(row: dict[str, float], keys: list[str]) -> str:
    return "".join(f"{row.get(k, float('nan')):>10.3f}" for k in keys)


def reference_rows(reference: dict[str, float], keys: list[str]) -> str:
    """The real clip's row (ceiling) and the mean-fill floor's, under a table of `keys`."""
    real = {k: reference.get(f"{k}_real", float("nan")) for k in keys if k not in ("fill_error", "background_error")}
    floor = {k: reference.get(f"{k}_floor", float("nan")) for k in ("fill_error", "text_alignment")}
    return f"{'  real clip':<22}{fmt(real, keys)}\n{'  floor (mean fill)':<22}{fmt(floor, keys)}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--steps", type=int, default=20, help="solver steps per sample")
    parser.add_argument("--sections", nargs="+", default=SECTIONS, choices=SECTIONS,
                        help="run only these (the others are kept from the last results file)")
    args, rest = parser.parse_known_args(argv)
    run = next((a.split("=", 1)[1] for a in rest if a.startswith("run=")), None)
    base = Path(run) if run else Path(os.environ.get("OUTPUT_DIR", ROOT / "outputs")) / "avid_structure"
    ckpt, overrides = run_checkpoint(str(base))
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    module, ema, batch, _ = load_run(ckpt, [*overrides, f"data.batch_size={args.clips}"], "avid_inpaint")
    bench = Bench(module, batch, args.clips, args.steps)
    keys = ["fill_error", "text_alignment", "background_error", "flicker", "seam_jump", "colour_drift"]
    head = "".join(f"{k[:9]:>10}" for k in keys)
    path = RESULTS / "avid_inpaint.json"
    result: dict = json.loads(path.read_text()) if set(args.sections) != set(SECTIONS) and path.exists() else {}
    result.update({"checkpoint": str(ckpt), "ema": ema, "window": WINDOW, "overlap": OVERLAP, "w_a": W_A})
    if set(args.sections) - {"scaling"}:  # scaling always inpaints one clip, and keeps its own step count
        result.update({"clips": bench.n, "steps": args.steps})
    if "presets" in args.sections:
        result["presets"] = presets(bench, keys, head)
    if "ablation" in args.sections:
        result["ablation"] = ablation(bench, keys, head)
    if "w_a" in args.sections:
        result["w_a"] = sweep(bench, keys, head, "w_a")
    if "w_s" in args.sections:
        result["w_s"] = sweep(bench, keys, head, "w_s")
    if "scaling" in args.sections:
        result["scaling"] = {**scaling(bench, args.lengths), "steps": args.steps}
        print(f"\n== time and memory against length (one clip) ==\n{'frames':<10}"
              + "".join(f"{m + ' s':>18}{m + ' MiB':>18}" for m in MODES if m in result["scaling"]))
        for frames in args.lengths:
            print(f"{frames:<10}" + "".join(f"{result['scaling'][m][frames]['seconds']:>18.2f}"
                                            f"{result['scaling'][m][frames]['peak_mib']:>18.1f}"
                                            for m in MODES if m in result["scaling"]))
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result


def presets(bench: Bench, keys: list[str], head: str) -> dict:
    """Every preset at 20 frames with the CLI's sampling (tmd_guided); writes avid_grid.png."""
    print(f"\n== presets, 20 frames, tmd_guided ==\n{'preset':<22}{head}")
    rows, grid = {}, []
    for preset, w_s in PRESETS.items():
        source, mask = bench.task(preset, 20)
        generated = bench.inpaint(source, mask, "tmd_guided", w_s)
        rows[preset] = {"w_s": w_s, "mask_fraction": float(mask.mean()),
                        **bench.measure(generated, source, mask, "tmd_guided", preset),
                        **bench.reference(source, mask, preset)}
        print(f"{preset:<22}{fmt(rows[preset], keys)}")
        print(reference_rows(rows[preset], keys))
        masked = source * (1 - mask) + mask * torch.tensor([1.0, -1.0, 1.0]).view(1, 3, 1, 1, 1)  # magenta hole
        out = composite(generated, source, mask)
        for i in range(min(3, bench.n)):
            grid += [frames_row(v[i, :, :10], 4) for v in (source, masked, out)]
    RESULTS.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(grid, axis=0)).save(RESULTS / "avid_grid.png")
    return rows


def ablation(bench: Bench, keys: list[str], head: str) -> dict:
    """The sampling modes at 32 and 64 frames (object swap)."""
    result = {}
    for frames in (32, 64):
        print(f"\n== ablation, {frames} frames, object swap ==\n{'mode':<22}{head}")
        source, mask = bench.task("object_swap", frames)
        result[frames] = {"real": bench.reference(source, mask, "object_swap")}
        for mode in MODES:
            row = bench.measure(bench.inpaint(source, mask, mode, 0.0), source, mask, mode, "object_swap")
            result[frames][mode] = row
            print(f"{mode:<22}{fmt(row, keys)}")
        print(reference_rows(result[frames]["real"], keys))
    return result


def sweep(bench: Bench, keys: list[str], head: str, weight: str) -> dict:
    """w_a: middle-frame guidance on tmd, 32 frames, object swap; w_s: structure guidance, 20 frames, retexture."""
    preset, frames, mode, values = (("object_swap", 32, "tmd", (0.0, 0.3, 0.5, 0.8, 1.0)) if weight == "w_a" else
                                    ("retexture", 20, "tmd_guided", (0.0, 0.5, 1.0)))
    print(f"\n== {weight}, {frames} frames, {mode}, {preset} ==\n{weight:<22}{head}")
    source, mask = bench.task(preset, frames)
    result = {}
    for value in values:
        w_s, w_a = (0.0, value) if weight == "w_a" else (value, None)
        result[value] = bench.measure(bench.inpaint(source, mask, mode, w_s, w_a=w_a), source, mask, mode, preset)
        print(f"{value:<22}{fmt(result[value], keys)}")
    return result


if __name__ == "__main__":
    main()
