"""Metrics of instruction-guided video editing on the world's held-out edit pairs (Movie Gen Edit, §5).

A pair is (source x, instruction, target y) with label maps L_x, L_y and the edited object's id o (json
"edit": kind, object). Every metric is computed for the edited clip g and, the same way, for the real target y
(the ceiling) and for the unedited source x ("do nothing", a floor):

    edit success   the probe (`evaluation.probe`, trained on the world's real clips) reads the attribute the
                   instruction asks for — recolour: colour, replace: shape, add and remove: colour and shape —
                   and scores its top-k agreement with the target's objects (k = their distinct values). For a
                   remove, the target keeps the other object alone: a clip that still shows the removed one
                   splits the probe's top-1 between the two (objects never share both colour and shape,
                   though the probe reads square and diamond as one class)
    preservation   mean_{p ∉ R} |g(p) − x(p)| over pixels and channels (in [-1, 1] units), R = the edited
                   region: {L_x = o} ∪ {L_y = o}, dilated by `dilate` pixels (antialiased edges); lower is better.
                   Its floor: the same error of another held-out clip's source (nothing preserved)
    temporal error mean_t |(g_{t+1} − g_t) − (y_{t+1} − y_t)|: how far the clip's frame-to-frame change departs
                   from the real edited video's; lower is better. Its floor: y with its frames in random order

Logs edit_success (+ _<kind>), preservation, temporal_error, each with _target, _source (and _shuffled for the
last two).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from lightning_modules.evaluation.base import Evaluator
from lightning_modules.evaluation.probe import (
    ProbeConfig,
    VideoProbe,
    attribute_targets,
    extract,
    probe_from_datamodule,
    topk_alignment,
)

ASKED = {"recolour": ("colour",), "replace": ("shape",), "add": ("colour", "shape"), "remove": ("colour", "shape")}


def edit_region(labels: torch.Tensor, target_labels: torch.Tensor, objects: Sequence[int], dilate: int = 1
                ) -> torch.Tensor:
    """R [B, 1, T, H, W] (float 0/1): pixels of object o_b in the source or the target labels [B, T, H, W],
    dilated by `dilate` pixels (a (2·dilate + 1)² max filter per frame)."""
    ids = torch.as_tensor(list(objects), device=labels.device).view(-1, 1, 1, 1)
    region = ((labels == ids) | (target_labels == ids)).float()
    if dilate > 0:
        b, t, h, w = region.shape
        region = F.max_pool2d(region.reshape(b * t, 1, h, w), 2 * dilate + 1, stride=1, padding=dilate)
        region = region.reshape(b, t, h, w)
    return region.unsqueeze(1)


def preservation_error(video: torch.Tensor, source: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Per clip [B]: Σ_{p ∉ R} |video − source| / (3·|p ∉ R|), the mean absolute error outside the edited region."""
    outside = (1.0 - region).expand_as(video)
    return ((video - source).abs() * outside).sum((1, 2, 3, 4)) / outside.sum((1, 2, 3, 4)).clamp_min(1.0)


def temporal_error(video: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per clip [B]: mean_t,p |(v_{t+1} − v_t) − (r_{t+1} − r_t)| of clips [B, 3, T, H, W] (T ≥ 2)."""
    if video.shape[2] < 2:
        raise ValueError(f"temporal_error needs at least 2 frames, got {video.shape[2]}")
    return (video.diff(dim=2) - reference.diff(dim=2)).abs().mean((1, 2, 3, 4))


def edit_success(probe: VideoProbe, video: torch.Tensor, metas: Sequence[dict[str, Any]], fps: Any) -> torch.Tensor:
    """Per clip [B]: the probe's top-k agreement with the target's objects on the attributes the edit asks for
    (`ASKED`), averaged over those attributes."""
    with torch.no_grad():
        scores = probe.outputs(extract(video.float().clamp(-1, 1), fps=fps))["scores"]
    targets = attribute_targets([{"objects": m["target_objects"], "background": m.get("background")} for m in metas])
    hits = topk_alignment(scores, targets)
    out = []
    for i, meta in enumerate(metas):
        asked = ASKED[meta["edit"]["kind"]]
        out.append(sum(float(hits[a][i]) for a in asked) / len(asked))
    return torch.tensor(out)


class EditEvaluator(Evaluator):
    """The metrics of the module docstring on held-out edit pairs (batches in the editor layout of
    `datamodules.edits`: "source", "video" = target, "labels", "target_labels", "meta" with "edit" and
    "target_objects"). The probe is trained on the datamodule's real clips (cached, as `ProbeEvaluator`'s).

    Args:
        cache_dir, width, features, steps, lr, clips, batch: the probe (`ProbeConfig`); dilate: of the region.
    """

    def __init__(self, cache_dir: str | None = None, width: int = 16, features: int = 32, steps: int = 600,
                 lr: float = 2e-3, clips: int = 1024, batch: int = 32, dilate: int = 1) -> None:
        self.cache_dir, self.dilate = cache_dir, int(dilate)
        self.config = ProbeConfig(width=width, features=features, steps=steps, lr=lr, clips=clips, batch=batch)
        self.probe: VideoProbe | None = None
        self.values: dict[str, list[torch.Tensor]] = {}

    def start(self, module: Any, trainer: Any) -> None:
        self.values = {}
        if self.probe is None and trainer is not None and trainer.datamodule is not None and not trainer.fast_dev_run:
            self.probe = probe_from_datamodule(trainer.datamodule, self.config, self.cache_dir, "cpu")

    def add(self, name: str, value: torch.Tensor) -> None:
        self.values.setdefault(name, []).append(value.detach().float().cpu())

    def update(self, generated: torch.Tensor, batch: dict[str, Any], extras: dict[str, torch.Tensor]) -> None:
        if "source" not in batch or "target_labels" not in batch or generated.shape[2] < 2:
            return
        n = generated.shape[0]
        generated = generated.float().cpu()
        source, target = batch["source"][:n].float().cpu(), batch["video"][:n].float().cpu()
        metas = list(batch["meta"])[:n]
        region = edit_region(batch["labels"][:n].cpu(), batch["target_labels"][:n].cpu(),
                             [int(m["edit"]["object"]) for m in metas], self.dilate)
        clips = {"": generated, "_target": target, "_source": source}
        for suffix, video in clips.items():
            self.add(f"preservation{suffix}", preservation_error(video, source, region))
            self.add(f"temporal_error{suffix}", temporal_error(video, target))
        self.add("preservation_shuffled", preservation_error(source.roll(1, dims=0), source, region))
        order = torch.randperm(target.shape[2], generator=torch.Generator().manual_seed(0))
        self.add("temporal_error_shuffled", temporal_error(target[:, :, order], target))
        if self.probe is None:
            return
        fps = torch.as_tensor(batch["fps"]).flatten()[:n].cpu()
        kinds = [m["edit"]["kind"] for m in metas]
        for suffix, video in clips.items():
            success = edit_success(self.probe, video, metas, fps)
            self.add(f"edit_success{suffix}", success)
            for kind in ASKED:
                chosen = torch.tensor([k == kind for k in kinds])
                if chosen.any():
                    self.add(f"edit_success{suffix}_{kind}", success[chosen])

    def compute(self) -> dict[str, float]:
        return {name: float(torch.cat(parts).mean()) for name, parts in sorted(self.values.items())}
