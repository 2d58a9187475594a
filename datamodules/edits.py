"""Training pairs for Movie Gen Edit (arXiv 2410.13720 §5), made without supervised video edits.

The world's video edit pairs (`world_kind: edits`: source "video", edited "target_video", instruction "text", label
maps "labels" / "target_labels") are held out: validation and test batches are those pairs in the editor's layout
(`video_edit_batch`). Training batches are built from the training split's pairs by the stage's recipe
(`EditDataModule.pairs`: kind → weight, one kind per batch):

    image_edit    stage I: one random frame f of a pair, as a one-frame video edit (x_f → y_f); each sample at a
                  random temporal position (`frame_offset`), not always the first frame's
    t2v           stage I/II: the source clip with its caption and no source video (the text-to-video task kept)
    animated      stage II, animated frame editing: one random affine motion A_τ (τ = 0..T−1) applied to both
                  images of a pair, x_τ = x_f ∘ A_τ⁻¹, y_τ = y_f ∘ A_τ⁻¹ (`affine_motion`, `animate`)
    segmentation  stage II, instruction-guided segmentation: a real clip; the target paints one object (its label
                  maps) flat in a marker colour ("Mark the red circle in blue.")
    backtranslate stage III: a real clip with a made-up instruction and its inverse ("Make the red circle blue." /
                  "Make the blue circle red."); the editor's output becomes the source, the inverse the prompt and
                  the real clip the target (`lightning_modules.editing.EditingModule.backtranslate`)
    video_edit    not a stage of the paper: the training split's supervised video edit pairs as they are
                  (`experiment=edit_supervised`, a diagnostic: what the same editor and budget reach when it is
                  given the supervision the stages do without)

Editor layout: "video" = the target (what is generated), "source" = the video to edit (absent for t2v), "text",
"task" (one name per sample: edit | t2v), "fps", "meta", and for evaluation "labels" / "target_labels".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from datamodules.synthetic.world import OBJECT_COLOURS, SHAPES
from datamodules.video import VideoDataModule

PAIR_KINDS = ("image_edit", "t2v", "animated", "segmentation", "backtranslate", "video_edit")


def video_edit_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """A world edit-pair batch in the editor layout: source = its "video", video = its "target_video"."""
    out = {k: v for k, v in batch.items() if k not in ("video", "target_video")}
    out |= {"source": batch["video"], "video": batch["target_video"], "task": ["edit"] * len(batch["text"])}
    return out


def image_edit_batch(batch: dict[str, Any], generator: torch.Generator, max_frames: int) -> dict[str, Any]:
    """Stage I: frame f ~ U{0..T−1} of each pair as a one-frame edit (fps 0, as images), at a temporal position
    frame_offset ~ U{0..max_frames−1}."""
    b, _, t = batch["video"].shape[:3]
    frame = torch.randint(0, t, (b,), generator=generator)
    rows = torch.arange(b)
    pick = lambda video: video[rows, :, frame].unsqueeze(2)  # [B, C, 1, H, W]
    out = {"video": pick(batch["target_video"]), "source": pick(batch["video"]), "text": list(batch["text"]),
           "task": ["edit"] * b, "fps": torch.zeros(b), "meta": batch.get("meta"),
           "frame_offset": torch.randint(0, max_frames, (b,), generator=generator)}
    for name in ("labels", "target_labels"):
        if name in batch:
            out[name] = batch[name][rows, frame].unsqueeze(1)
    return out


def t2v_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """The source clips with their own captions (the world's json "caption"), no source video: text-to-video."""
    captions = [m["caption"] for m in batch["meta"]]
    return {"video": batch["video"], "text": captions, "task": ["t2v"] * len(captions), "fps": batch["fps"],
            "meta": batch["meta"]}


def affine_motion(batch_size: int, frames: int, generator: torch.Generator, shift: float = 0.08,
                  rotation: float = 6.0, zoom: float = 0.03) -> torch.Tensor:
    """Random affine motions [B, T, 2, 3] for `F.affine_grid` (normalised coordinates, [-1, 1]): per sample a
    velocity v (|v_i| ≤ shift, canvas half-widths per frame), a turn rate ω (|ω| ≤ rotation degrees per frame)
    and a zoom rate z (|log z| ≤ zoom per frame); frame τ samples the image at

        p' = z^(−τ)·R(−ωτ)·(p − vτ)      (the content moves by vτ, turns by ωτ, grows by z^τ; τ = 0 is the identity)
    """
    draw = lambda limit: (torch.rand(batch_size, generator=generator) * 2 - 1) * limit
    velocity = torch.stack([draw(shift), draw(shift)], dim=-1)  # [B, 2] (x, y)
    turn, log_zoom = draw(math.radians(rotation)), draw(zoom)
    tau = torch.arange(frames, dtype=torch.float32)
    angle = -turn[:, None] * tau                                  # [B, T]
    scale = torch.exp(-log_zoom[:, None] * tau)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    linear = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # [B, T, 2, 2]
    offset = -torch.einsum("btij,btj->bti", linear, velocity[:, None] * tau[None, :, None])
    return torch.cat([linear, offset[..., None]], dim=-1)


def animate(image: torch.Tensor, motion: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """A one-frame video [B, C, 1, H, W] (or image [B, C, H, W]) moved by `motion` [B, T, 2, 3] → [B, C, T, H, W];
    outside the canvas the border pixels continue (the background)."""
    image = image[:, :, 0] if image.ndim == 5 else image
    b, c, h, w = image.shape
    t = motion.shape[1]
    grid = F.affine_grid(rearrange(motion, "b t i j -> (b t) i j"), [b * t, c, h, w], align_corners=False)
    frames = image.unsqueeze(1).expand(b, t, c, h, w).reshape(b * t, c, h, w)
    moved = F.grid_sample(frames.float(), grid.to(image.device), mode=mode, padding_mode="border", align_corners=False)
    return rearrange(moved, "(b t) c h w -> b c t h w", b=b)


def animated_batch(batch: dict[str, Any], generator: torch.Generator, frames: int) -> dict[str, Any]:
    """Stage II, animated frame editing: an image edit pair (frame f of a pair) moved by one random affine motion,
    the same for source and target (and their label maps, nearest)."""
    pair = image_edit_batch(batch, generator, 1)
    motion = affine_motion(pair["video"].shape[0], frames, generator)
    out = {**pair, "video": animate(pair["video"], motion), "source": animate(pair["source"], motion),
           "fps": batch["fps"], "motion": motion}
    out.pop("frame_offset")
    for name in ("labels", "target_labels"):
        if name in pair:
            out[name] = animate(pair[name][:, None].float(), motion, mode="nearest")[:, 0].round().long()
    return out


def _object_words(meta: Mapping[str, Any], object_id: int) -> tuple[str, str]:
    obj = next(o for o in meta["objects"] if int(o["id"]) == object_id)
    return obj["colour"], obj["shape"]


def segmentation_batch(batch: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
    """Stage II, instruction-guided segmentation: each real clip (the pair's source) with one of its visible
    objects painted flat in a marker colour m ≠ its colour: target = x·(1 − M) + m·M, M = its label maps;
    instruction "Mark the <colour> <shape> in <m>."."""
    video, labels = batch["video"], batch["labels"]
    targets, texts = [], []
    names = list(OBJECT_COLOURS)
    for i, meta in enumerate(batch["meta"]):
        visible = [int(v) for v in labels[i].unique().tolist() if v > 0]
        object_id = visible[int(torch.randint(0, len(visible), (1,), generator=generator))] if visible else 0
        if not object_id:  # nothing to mark: the clip is its own target
            targets.append(video[i])
            texts.append("Mark nothing.")
            continue
        colour, shape = _object_words(meta, object_id)
        options = [n for n in names if n != colour]
        marker = options[int(torch.randint(0, len(options), (1,), generator=generator))]
        rgb = torch.tensor(OBJECT_COLOURS[marker], dtype=video.dtype).view(3, 1, 1, 1) / 127.5 - 1.0
        mask = (labels[i] == object_id).unsqueeze(0).to(video.dtype)
        targets.append(video[i] * (1 - mask) + rgb.to(video.device) * mask)
        texts.append(f"Mark the {colour} {shape} in {marker}.")
    return {"video": torch.stack(targets), "source": video, "text": texts, "task": ["edit"] * len(texts),
            "fps": batch["fps"], "meta": batch["meta"], "labels": labels}


def inverse_instruction_pair(meta: Mapping[str, Any], rng: np.random.Generator) -> tuple[str, str]:
    """(instruction, its inverse) for a real clip: recolour or replace one of its objects.
    "Make the red circle blue." / "Make the blue circle red."; "Replace the red circle with a red star." /
    "Replace the red star with a red circle."."""
    obj = meta["objects"][int(rng.integers(len(meta["objects"])))]
    colour, shape = obj["colour"], obj["shape"]
    if rng.random() < 0.5:
        new = str(rng.choice([c for c in OBJECT_COLOURS if c != colour]))
        return f"Make the {colour} {shape} {new}.", f"Make the {new} {shape} {colour}."
    new = str(rng.choice([s for s in SHAPES if s != shape]))
    return (f"Replace the {colour} {shape} with a {colour} {new}.",
            f"Replace the {colour} {new} with a {colour} {shape}.")


def backtranslation_batch(batch: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """Stage III's input: the real clips (the pairs' sources) with a made-up instruction ("text") and its inverse
    ("inverse_text"); the editor completes it (`EditingModule.backtranslate`)."""
    pairs = [inverse_instruction_pair(m, rng) for m in batch["meta"]]
    return {"video": batch["video"], "text": [p[0] for p in pairs], "inverse_text": [p[1] for p in pairs],
            "task": ["edit"] * len(pairs), "fps": batch["fps"], "meta": batch["meta"]}


class EditDataModule(VideoDataModule):
    """The world's edit pairs: held out (validation / test, in the editor layout) and the raw material of the
    training stages (see the module docstring).

    Args:
        pairs: kind → weight of the training batches (kinds: image_edit, t2v, animated, segmentation,
            backtranslate, video_edit), e.g. stage I {image_edit: 5, t2v: 1} (the paper's image edits ~5× more often).
        max_frames: temporal positions an image edit may take (the backbone's latent frames, model.net.max_t).
        **kwargs: the options of `VideoDataModule` (world_kind edits, with_target and with_masks are forced).
    """

    def __init__(self, pairs: Mapping[str, float] | None = None, max_frames: int = 8, **kwargs: Any) -> None:
        kwargs |= {"world_kind": "edits", "with_target": True, "with_masks": True}
        super().__init__(**kwargs)
        pairs = dict(pairs or {"image_edit": 5.0, "t2v": 1.0})
        unknown = sorted(set(pairs) - set(PAIR_KINDS))
        if unknown or not pairs or min(pairs.values()) < 0 or sum(pairs.values()) <= 0:
            raise ValueError(f"data.pairs={pairs}: kinds must be among {PAIR_KINDS} with weights >= 0, sum > 0")
        self.pair_kinds = list(pairs)
        self.pair_weights = torch.tensor([float(w) for w in pairs.values()])
        self.max_frames = int(max_frames)
        self.generator = torch.Generator().manual_seed(int(kwargs.get("seed") or 0))
        self.rng = np.random.default_rng(int(kwargs.get("seed") or 0))

    def training_batch(self, batch: dict[str, Any], kind: str | None = None) -> dict[str, Any]:
        """A training batch of `kind` (default: drawn by the weights) from a world edit-pair batch."""
        if kind is None:
            kind = self.pair_kinds[int(torch.multinomial(self.pair_weights, 1, generator=self.generator))]
        if kind == "image_edit":
            return image_edit_batch(batch, self.generator, self.max_frames)
        if kind == "t2v":
            return t2v_batch(batch)
        if kind == "animated":
            return animated_batch(batch, self.generator, batch["video"].shape[2])
        if kind == "segmentation":
            return segmentation_batch(batch, self.generator)
        if kind == "backtranslate":
            return backtranslation_batch(batch, self.rng)
        if kind == "video_edit":
            return video_edit_batch(batch)
        raise ValueError(f"unknown pair kind {kind!r}; one of {PAIR_KINDS}")

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        batch = super().on_before_batch_transfer(batch, dataloader_idx)
        if not isinstance(batch, dict) or "target_video" not in batch:
            return batch
        training = self.trainer is not None and self.trainer.training
        return self.training_batch(batch) if training else video_edit_batch(batch)
