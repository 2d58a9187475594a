"""AVID's any-length text-guided video inpainting from the command line, and its metrics (arXiv 2312.03816).

    python experiments/run.py experiment=avid_structure task=inpaint ckpt_path=last \
        inpaint.source=<video file or folder of frames> inpaint.mask=<mask image or mask video> \
        inpaint.prompt="A red circle." inpaint.preset=retexture

1. The source (an mp4, or a folder of png/jpg frames in name order) and the mask (an image: the first frame's mask,
   propagated to every frame; or a video: one mask per frame; white = fill) are read and resized to the model's
   frame size (`model.sample.height/width`).
2. The task preset sets the structure guidance weight w_s (AVID: retexturing 1, object swap 0, uncropping 0).
3. The clip is generated at any length by Temporal MultiDiffusion: overlapping windows of `window` latent frames
   (the training length) with `overlap` frames, every window denoised at every step and the predictions averaged
   where they overlap (`generative.multidiffusion`, through `model.sampler.window / overlap`).
4. Outside the mask the source pixels are kept exactly: output = mask · generated + (1 − mask) · source.
5. The mp4, its caption and `metrics.json` (below) are written to `inpaint.output_dir` and logged to MLflow.

Metrics (`inpainting_metrics`), on pixels in [-1, 1]:
    background_error   mean |generated − source| outside the mask, before the paste (what the model itself keeps)
    temporal_flicker   mean |x_{f+1} − x_f| inside the mask, beside the source's own (`_source`)
    seam_jump          the frame-to-frame change inside the mask at window boundaries over the change elsewhere
                       (1 = no visible seam)
    colour_drift       |mean colour of the filled region in the last frame − in the first|
    text_alignment     the share of frames whose filled region reads, by the world's palette
                       (`evaluation.palette`), as the colour the prompt names (the first of the world's object
                       colours in it; absent when it names none): majority object-colour label of its pixels

Middle-frame attention guidance (AVID §3.3; `inpaint.anchor_weight` = ω_a, `nn.attention.MiddleFrameAnchors`):
at every step the window holding the middle frame is denoised first; its spatial self-attention keys and values
of that frame then guide every frame of the other windows, blended with weight ω_a.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from einops import rearrange

from datamodules.media import decode_image, decode_video, frames_to_video
from datamodules.synthetic.world import OBJECT_COLOURS
from lightning_modules.conditioning import resize_video
from lightning_modules.evaluation.palette import palette_labels
from lightning_modules.evaluation.samples import log_artifacts, slug, write_clip
from lightning_modules.generation import IMAGE_SUFFIXES
from lightning_modules.generative.multidiffusion import window_spans
from lightning_modules.nn.text import words

PRESETS = {"retexture": 1.0, "object_swap": 0.0, "uncrop": 0.0}  # structure guidance weight w_s
OBJECT_NAMES = list(OBJECT_COLOURS)


def read_frames(location: str | Path) -> tuple[torch.Tensor, float]:
    """(video [1, 3, T, H, W] in [-1, 1], fps) of a video file, or of a folder of image frames (fps 8)."""
    path = Path(location)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"inpaint.source={location}: no frames ({', '.join(IMAGE_SUFFIXES)}) in the folder")
        frames = torch.stack([torch.from_numpy(decode_image(f.read_bytes())) for f in files])
        return frames_to_video(frames)[None], 8.0
    if not path.is_file():
        raise FileNotFoundError(f"inpaint.source={location}: no such file or folder")
    clip = decode_video(path)
    return frames_to_video(torch.from_numpy(clip.frames))[None], float(clip.fps)


def read_mask(location: str | Path, frames: int, height: int, width: int) -> torch.Tensor:
    """[1, 1, T, H, W] in {0, 1} (1 = fill) from a mask image (propagated to every frame) or a mask video (its
    frames resampled to `frames`), thresholded at mid-grey after the resize."""
    path = Path(location)
    if not path.is_file():
        raise FileNotFoundError(f"inpaint.mask={location}: no such file")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        mask = frames_to_video(torch.from_numpy(decode_image(path.read_bytes()))[None])[None]
        mask = mask.expand(-1, -1, frames, -1, -1)
    else:
        mask, _ = read_frames(path)
        index = torch.linspace(0, mask.shape[2] - 1, frames).round().long()
        mask = mask[:, :, index]
    mask = resize_video(mask.mean(dim=1, keepdim=True), height, width)
    return (mask > 0.0).float()


def composite(generated: torch.Tensor, source: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mask · generated + (1 − mask) · source: the source's pixels outside the mask, exactly."""
    return torch.where(mask > 0.5, generated, source)


def prompt_colour(prompt: str) -> int | None:
    """Index (in the world's OBJECT_COLOURS) of the first object colour named in the prompt, or None."""
    return next((OBJECT_NAMES.index(w) for w in words(prompt) if w in OBJECT_NAMES), None)


def fill_colour_alignment(video: torch.Tensor, mask: torch.Tensor, colour: int) -> float:
    """Share of the frames (with a hole) of video [1, 3, T, H, W] whose masked pixels' most common object-colour
    label (`palette_labels`, labels < 8; a frame with none counts as a miss) is `colour`."""
    labels = palette_labels(video)[0]  # [T, H, W]
    hits = []
    for f in range(labels.shape[0]):
        inside = labels[f][mask[0, 0, f] > 0.5]
        if inside.numel() == 0:
            continue
        objects = inside[inside < len(OBJECT_NAMES)]
        hits.append(objects.numel() > 0 and int(objects.mode().values) == colour)
    return float(sum(hits) / len(hits)) if hits else float("nan")


def inpainting_metrics(generated: torch.Tensor, source: torch.Tensor, mask: torch.Tensor,
                       window_starts: list[int], prompt: str | None = None) -> dict[str, float]:
    """The metrics of the module docstring for one clip: generated (before the paste), source [1, 3, T, H, W],
    mask [1, 1, T, H, W]; `window_starts` the first frame of each window after the first; `prompt` (optional)
    for text_alignment."""
    inside, outside = mask.expand_as(source) > 0.5, mask.expand_as(source) <= 0.5
    out = composite(generated, source, mask)
    metrics = {"background_error": float((generated - source).abs()[outside].mean()) if outside.any() else 0.0}
    if out.shape[2] > 1:
        step = (out[:, :, 1:] - out[:, :, :-1]).abs()  # [1, 3, T-1, H, W]; step f is frames f -> f+1
        step_source = (source[:, :, 1:] - source[:, :, :-1]).abs()
        both = inside[:, :, 1:] & inside[:, :, :-1]
        per_step = torch.stack([step[:, :, f][both[:, :, f]].mean() if both[:, :, f].any() else step.new_tensor(0.0)
                                for f in range(step.shape[2])])
        metrics["temporal_flicker"] = float(step[both].mean()) if both.any() else 0.0
        metrics["temporal_flicker_source"] = float(step_source[both].mean()) if both.any() else 0.0
        seams = [s - 1 for s in window_starts if 0 < s < out.shape[2]]
        others = [f for f in range(per_step.shape[0]) if f not in seams]
        if seams and others and per_step[others].mean() > 0:
            metrics["seam_jump"] = float(per_step[seams].mean() / per_step[others].mean())
    colour_index = prompt_colour(prompt) if prompt else None
    if colour_index is not None:
        metrics["text_alignment"] = fill_colour_alignment(out, mask, colour_index)
    colour = [rearrange(out[:, :, f], "1 c h w -> (h w) c")[rearrange(inside[:, 0, f], "1 h w -> (h w)")].mean(0)
              for f in (0, out.shape[2] - 1) if inside[:, 0, f].any()]
    if len(colour) == 2:
        metrics["colour_drift"] = float((colour[1] - colour[0]).abs().mean())
    return metrics


@torch.no_grad()
def inpaint_to_files(module: Any, trainer: Any, options: dict[str, Any]) -> dict[str, float]:
    """`task=inpaint` (the module docstring): read, generate window by window, paste, measure, write."""
    preset = options.get("preset", "retexture")
    if preset not in PRESETS:
        raise ValueError(f"inpaint.preset={preset!r}; choose one of {sorted(PRESETS)}")
    for key in ("source", "mask"):
        if not options.get(key):
            raise ValueError(f"task=inpaint needs inpaint.{key}=<file>")
    module.to(trainer.strategy.root_device).eval()
    height, width = module.sample_cfg.height, module.sample_cfg.width
    source, fps = read_frames(options["source"])
    source = resize_video(source, height, width)
    frames = source.shape[2]
    mask = read_mask(options["mask"], frames, height, width)
    if hasattr(module.net, "structure_weight"):
        module.net.structure_weight = PRESETS[preset]
    window, overlap = int(options.get("window") or frames), int(options.get("overlap") or 0)
    module.sampler.window, module.sampler.overlap = (window, overlap) if frames > window else (None, 0)
    module.sampler.anchor_weight = float(options.get("anchor_weight") or 0.0)
    prompt = str(options.get("prompt") or "")
    batch = {"video": source, "mask": mask, "text": [prompt], "fps": torch.tensor([fps])}
    generated = module.generate(batch, frames, height, width, seed=module.sampler.seed)
    starts = [s for s, _ in window_spans(frames, window, overlap)][1:] if frames > window else []
    metrics = {"frames": frames, "windows": len(starts) + 1, "w_s": PRESETS[preset],
               "w_a": module.sampler.anchor_weight, **inpainting_metrics(generated.cpu(), source, mask, starts, prompt)}
    folder = Path(options.get("output_dir") or Path(trainer.default_root_dir) / "inpainted")
    stem = folder / f"{slug(Path(options['source']).stem)}_{preset}"
    written = write_clip(stem, composite(generated.cpu(), source, mask)[0], prompt, fps)
    metrics_file = stem.with_suffix(".json")
    metrics_file.write_text(json.dumps(metrics, indent=1))
    log_artifacts(trainer, [*written, metrics_file], "inpainted")
    print(f"[inpaint] {frames} frames in {metrics['windows']} windows, preset {preset} (w_s = {PRESETS[preset]}): "
          + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)) + f" -> {stem}.mp4")
    return metrics
