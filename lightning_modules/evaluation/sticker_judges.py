"""Automatic judges, review gallery and human-in-the-loop selection of the sticker ensemble of teachers.

Animated Stickers (arXiv 2402.06088) keeps, among the teachers' candidate animations, those a person finds good
(motion present and large enough, temporally consistent, looping, keeping the sticker, relevant to the prompt).
Here the judges below give a first verdict, `write_gallery` shows it to a person (index.html + labels.csv), and
`select` lets the person's `keep` labels override the judges. Prompt relevance comes from the caller (the probe).

Videos are [B, 3, T, H, W] in [-1, 1]; every score works on x = (video + 1) / 2 in [0, 1] and returns [B].
Notation: d(i, j) = mean over channels and pixels of |x_i - x_j| between frames i and j of one clip, on 8 x 8
thumbnails (`frame_distances`); A = mean_t d(t, t+1), the mean step. Scores are higher = better except `looping`
(a gap: lower = better). `JudgeThresholds` holds defaults calibrated on the synthetic world's sticker clips.
"""

from __future__ import annotations

import csv
import html
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from datamodules.media import to_uint8_frames, write_gif, write_image
from lightning_modules.evaluation.base import Evaluator
from lightning_modules.evaluation.probe import ProbeConfig, clip_alignment, probe_from_datamodule

EPS = 1e-8
SCORES = ("motion", "consistency", "looping", "identity", "relevance")
TRUE, FALSE = {"1", "yes", "y", "true", "keep"}, {"0", "no", "n", "false", "reject"}


def _unit(video: torch.Tensor) -> torch.Tensor:
    return ((video.float() + 1) / 2).clamp(0, 1)


def frame_distances(video: torch.Tensor, grid: int = 8) -> torch.Tensor:
    """D[b, i, j] = d(i, j) = mean_{c,h,w} |x_i - x_j| between every pair of frames, on grid x grid thumbnails
    (area averages; frames smaller than the grid are used as they are): [B, T, T]. Thumbnails keep distances
    growing with displacement: at full resolution a textured or hard-edged object moved by its own width (or its
    texture's period) is as far as moved anywhere, and consistency/looping ratios saturate."""
    size = (min(grid, video.shape[3]), min(grid, video.shape[4]))
    frames = rearrange(F.adaptive_avg_pool2d(rearrange(_unit(video), "b c t h w -> (b t) c h w"), size),
                       "(b t) c h w -> b t (c h w)", b=video.shape[0])
    return torch.cdist(frames, frames, p=1) / frames.shape[-1]


def motion(video: torch.Tensor) -> torch.Tensor:
    """Motion size: M = 1/(T-1) sum_t mean_{c,h,w} |x_{t+1} - x_t|, the mean absolute difference of consecutive
    frames in [0, 1] pixel units at full resolution (world.motion_score's formula). 0 for a still clip."""
    x = _unit(video)
    return (x[:, :, 1:] - x[:, :, :-1]).abs().mean(dim=(1, 2, 3, 4))


def _mean_step(distances: torch.Tensor) -> torch.Tensor:
    """A = mean_t d(t, t+1) from D [B, T, T]: [B]."""
    return torch.diagonal(distances, offset=1, dim1=1, dim2=2).mean(dim=1)


def consistency(video: torch.Tensor, grid: int = 8) -> torch.Tensor:
    """Temporal consistency: C = 1 - A / P, A = mean_t d(t, t+1) the mean step, P = mean_{i != j} d(i, j) the mean
    distance of any two frames (`frame_distances`, thumbnails). Higher = better, at most 1.

    Smooth motion moves a little per frame, so neighbours are closer than frames far apart (A < P; a uniform loop
    of T frames gives 1 - sin(pi/T) / mean_k sin(pi k/T): 0.47 at T = 8, 0.71 at T = 16). The same frames in a
    random order make neighbours as far as any pair (A ~ P, C ~ 0 +- 0.2). The ratio is scale-free, so small and
    large motions are judged alike; how much there is is `motion`'s job: a still clip (A = P = 0) gets C = 1 (it
    is consistent) and fails on motion instead. Limits: needs T >= 3 (T = 2 gives 0); a motion aliased by the
    frame rate (a square spun 45 degrees a frame alternates two poses) looks shuffled and scores low."""
    distances, frames = frame_distances(video, grid), video.shape[2]
    pairs = distances.sum(dim=(1, 2)) / (frames * (frames - 1))
    return 1 - _mean_step(distances) / (pairs + EPS)


def looping(video: torch.Tensor, grid: int = 8) -> torch.Tensor:
    """Loop gap in steps: L = d(T-1, 0) / A, how far the last frame is from the first in mean steps (thumbnails).

    LOWER IS BETTER. A seamless loop (frame T would be frame 0) has L ~ 1 (a sine bob ~ pi/2: its wrap step is its
    fastest); a clip drifting one way has L ~ T - 1 (less where distances saturate). A still clip gets 0."""
    distances = frame_distances(video, grid)
    return distances[:, -1, 0] / (_mean_step(distances) + EPS)


def colour_histograms(images: torch.Tensor, bins: int = 8) -> torch.Tensor:
    """Joint RGB histograms with `bins` levels per channel of images [N, 3, H, W] in [-1, 1]: [N, bins**3],
    each summing to 1."""
    levels = (_unit(images) * bins).long().clamp(max=bins - 1)
    index = rearrange((levels[:, 0] * bins + levels[:, 1]) * bins + levels[:, 2], "n h w -> n (h w)")
    counts = torch.zeros(index.shape[0], bins**3, device=index.device).scatter_add_(1, index, torch.ones_like(index, dtype=torch.float))
    return counts / index.shape[1]


def identity(video: torch.Tensor, sticker: torch.Tensor, frame_index: int | torch.Tensor,
             bins: int = 8) -> torch.Tensor:
    """Sticker kept: I = 1/2 (1 - mean |s - x_f|) + 1/2 mean_t sum_k min(h(s)_k, h(x_t)_k), in [0, 1].

    s = the sticker [B, 3, H, W], x_f = the clip's conditioning frame (frame_index, an int or [B]); the first term
    is its pixel agreement, the second the histogram intersection of the colour histograms h (`colour_histograms`,
    `bins`^3 joint RGB bins) of the sticker and of every frame, averaged over frames: the clip keeps the sticker's
    colours (style) throughout, wherever the object moves. 1 = the conditioning frame is the sticker and every
    frame has its colours; higher = better."""
    x, s = _unit(video), _unit(sticker)
    batch, frames = x.shape[0], x.shape[2]
    index = torch.as_tensor(frame_index, device=x.device).expand(batch)
    pixel = 1 - (x[torch.arange(batch), :, index] - s).abs().mean(dim=(1, 2, 3))
    clip = colour_histograms(rearrange(video, "b c t h w -> (b t) c h w"), bins)
    still = colour_histograms(sticker, bins)
    overlap = torch.minimum(rearrange(clip, "(b t) k -> b t k", t=frames), still[:, None]).sum(dim=2)
    return (pixel + overlap.mean(dim=1)) / 2


@dataclass
class JudgeThresholds:
    """Pass thresholds (motion, consistency, identity, relevance: at least; looping: at most), calibrated on the
    world's sticker clips (2 x 128 clips, seeds 0 and 1, 64 px, 8 and 16 frames, the middle frame as sticker):

    motion       moving clips >= 0.0024 (a slow pulse); a solid circle swaying or spinning is still (0)
    consistency  real clips >= 0.25 in 82%: all but the aliased spins (a symmetric shape turning 22.5 or 45 degrees
                 a frame); the same frames shuffled in time 5-7%
    looping      real clips <= 2.73; a sticker drifting 2 px a frame >= 2.56 (median 6.2)
    identity     real clips >= 0.976; another clip's sticker: median 0.41, 95th percentile 0.93
    relevance    the caller's per-clip score (e.g. probe alignment in [0, 1]); 0.5 is a placeholder to tune
    """

    motion_min: float = 0.002
    consistency_min: float = 0.25
    looping_max: float = 3.0
    identity_min: float = 0.95
    relevance_min: float = 0.5


def judge(video: torch.Tensor, sticker: torch.Tensor, frame_index: int | torch.Tensor,
          relevance: torch.Tensor | None = None, thresholds: JudgeThresholds | None = None) -> dict[str, torch.Tensor]:
    """Scores and verdicts of a batch: {score: [B] float} for motion, consistency, looping, identity (and
    relevance when given), {score}_pass: [B] bool (looping passes when <= looping_max, the others when >= their
    minimum), and pass = all criteria passed. Without `relevance` that criterion is left out (no key, no vote)."""
    limits = thresholds or JudgeThresholds()
    scores = {"motion": motion(video), "consistency": consistency(video), "looping": looping(video),
              "identity": identity(video, sticker, frame_index)}
    if relevance is not None:
        scores["relevance"] = torch.as_tensor(relevance, dtype=torch.float).reshape(video.shape[0])
    result = {name: value.detach().cpu() for name, value in scores.items()}
    for name, value in list(result.items()):
        result[f"{name}_pass"] = value <= limits.looping_max if name == "looping" else value >= getattr(
            limits, f"{name}_min")
    result["pass"] = torch.stack([result[f"{name}_pass"] for name in scores]).all(dim=0)
    return result


# ---------------------------------------------------------------------------------------------------------------
# the gallery and the human in the loop


@dataclass
class Candidate:
    """One teacher output: sticker [3, H, W] and video [3, T, H, W] in [-1, 1]; `key` is unique in a gallery."""

    key: str
    teacher: str
    prompt: str
    sticker: torch.Tensor
    video: torch.Tensor
    fps: float = 8.0


def records(candidates: Sequence[Candidate], scores: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One dict per candidate: key, teacher, prompt, each score (float), each `_pass` flag and pass (bool), from
    `scores` = judge outputs concatenated in the order of `candidates` (tensors or sequences of length N)."""
    columns = {name: torch.as_tensor(value).reshape(-1).tolist() for name, value in scores.items()}
    for name, value in columns.items():
        if len(value) != len(candidates):
            raise ValueError(f"scores[{name!r}] has {len(value)} values for {len(candidates)} candidates")
    return [{"key": c.key, "teacher": c.teacher, "prompt": c.prompt, **{n: v[i] for n, v in columns.items()}}
            for i, c in enumerate(candidates)]


def write_gallery(folder: str | Path, candidates: Sequence[Candidate], scores: Mapping[str, Any]) -> Path:
    """Write <folder>/<key>.gif (the animation, looping; GIF delays round to 1/100 s), <key>.png (the sticker),
    index.html (sticker, animation, prompt, teacher and scores coloured pass/fail) and labels.csv (key, teacher,
    prompt, judge_pass, each score, and an empty `keep` column for a person: 1/0, yes/no, y/n, true/false,
    keep/reject). `scores` as for `records`. Returns the folder."""

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = records(candidates, scores)
    names = [n for n in SCORES if n in scores]
    if len({c.key for c in candidates}) != len(candidates):
        raise ValueError("write_gallery: candidate keys must be unique")
    for bad in (c.key for c in candidates if not re.fullmatch(r"[A-Za-z0-9._-]+", c.key)):
        raise ValueError(f"write_gallery: key {bad!r} is not a file name (use letters, digits, '.', '_', '-')")
    cells = []
    for candidate, row in zip(candidates, rows):
        write_image(folder / f"{candidate.key}.png", candidate.sticker)
        write_gif(folder / f"{candidate.key}.gif", candidate.video, candidate.fps)
        verdicts = "".join(f'<td class="{"pass" if row.get(f"{n}_pass", True) else "fail"}">{row[n]:.3f}</td>'
                           for n in names)
        cells.append(f'<tr class="{"pass" if row["pass"] else "fail"}"><td>{html.escape(candidate.key)}</td>'
                     f'<td><img src="{html.escape(candidate.key)}.png"></td>'
                     f'<td><img src="{html.escape(candidate.key)}.gif"></td><td>{html.escape(candidate.prompt)}</td>'
                     f'<td>{html.escape(candidate.teacher)}</td>{verdicts}<td>{"pass" if row["pass"] else "fail"}</td></tr>')
    style = ("img{width:160px;image-rendering:pixelated}td{padding:4px;border:1px solid #ccc}"
             "td.pass{background:#c8f0c8}td.fail{background:#f4c2c2}")
    head = "".join(f"<th>{h}</th>" for h in ["key", "sticker", "animation", "prompt", "teacher", *names, "judges"])
    (folder / "index.html").write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>sticker candidates</title><style>{style}</style>"
        f"</head><body><table><tr>{head}</tr>\n" + "\n".join(cells) + "\n</table></body></html>\n", encoding="utf-8")
    with open(folder / "labels.csv", "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["key", "teacher", "prompt", "judge_pass", *names, "keep"])
        for row in rows:
            writer.writerow([row["key"], row["teacher"], row["prompt"], int(row["pass"]),
                             *(f"{row[n]:.6g}" for n in names), ""])
    return folder


def frame_grid(candidates: Sequence[Candidate], scale: int = 4) -> np.ndarray:
    """uint8 [rows·H·scale, (T + 1)·W·scale, 3]: one row per candidate, its sticker then its frames (nearest-neighbour
    scaled), for a picture of sticker → animation (the README's)."""
    rows = [np.concatenate([to_uint8_frames(c.sticker)[0], *to_uint8_frames(c.video)], axis=1) for c in candidates]
    return np.concatenate(rows, axis=0).repeat(scale, axis=0).repeat(scale, axis=1)


def read_labels(path: str | Path) -> dict[str, bool | None]:
    """{key: True (keep) | False (reject) | None (blank: no label)} from a labels.csv (columns key and keep).
    A keep value other than 1/0, yes/no, y/n, true/false, keep/reject (any case) or blank, or a key twice, raises a
    one-line ValueError naming the line."""
    labels: dict[str, bool | None] = {}
    with open(path, newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        if not {"key", "keep"} <= set(reader.fieldnames or []):
            raise ValueError(f"{path}: needs columns 'key' and 'keep', found {reader.fieldnames}")
        for row in reader:
            value = (row["keep"] or "").strip().lower()
            if value and value not in TRUE | FALSE:
                raise ValueError(f"{path} line {reader.line_num} (key {row['key']}): keep={row['keep']!r} "
                                 "is not 1/0, yes/no, y/n, true/false, keep/reject or blank")
            if row["key"] in labels:
                raise ValueError(f"{path} line {reader.line_num}: key {row['key']} appears twice")
            labels[row["key"]] = None if not value else value in TRUE
    return labels


def select(keys: Sequence[str], judge_pass: Sequence[bool] | torch.Tensor,
           labels: Mapping[str, bool | None]) -> list[str]:
    """The kept keys, in order: a person's label wins when present (not None), else the judges' verdict."""
    verdicts = torch.as_tensor(judge_pass).reshape(-1).tolist()
    return [k for k, v in zip(keys, verdicts, strict=True) if (v if labels.get(k) is None else labels[k])]


def selection_summary(keys: Sequence[str], judge_pass: Sequence[bool] | torch.Tensor,
                      labels: Mapping[str, bool | None]) -> dict[str, int]:
    """Counts: kept / rejected by a label, kept / rejected by the judges (no label), overridden (a label against
    the judges' verdict), and kept in all."""
    verdicts = torch.as_tensor(judge_pass).reshape(-1).tolist()
    summary = dict.fromkeys(["kept_by_label", "rejected_by_label", "kept_by_judges", "rejected_by_judges",
                             "overridden"], 0)
    for key, verdict in zip(keys, verdicts, strict=True):
        label = labels.get(key)
        who = "judges" if label is None else "label"
        summary[f"{'kept' if (verdict if label is None else label) else 'rejected'}_by_{who}"] += 1
        summary["overridden"] += int(label is not None and label != bool(verdict))
    summary["kept"] = summary["kept_by_label"] + summary["kept_by_judges"]
    return summary


def pass_rates(records: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """{teacher: {criterion: fraction of its candidates passing}} over the records' boolean `<score>_pass` flags
    and `pass` (as `records(...)` gives them); the caller logs them, e.g. as `judges/<teacher>/<criterion>`."""
    flags: dict[str, dict[str, list[bool]]] = {}
    for record in records:
        per = flags.setdefault(str(record["teacher"]), {})
        for name, value in record.items():
            if name == "pass" or name.endswith("_pass"):
                per.setdefault(name.removesuffix("_pass"), []).append(bool(value))
    return {teacher: {name: sum(v) / len(v) for name, v in per.items()} for teacher, per in flags.items()}


# ---------------------------------------------------------------------------------------------------------------
# the judges as an evaluator of the test loop


class StickerJudges(Evaluator):
    """Each judge's pass rate on the clips a sticker model generates for the held-out stickers (the test loop),
    beside the same judges on the real clips (the ceiling): judge_<criterion> and judge_real_<criterion>, for
    motion, consistency, looping, identity, relevance (the probe's per-clip alignment, as `probe.clip_alignment`)
    and pass (every criterion). The sticker is the batch's "image", else the frame of the clip the model's
    `StillImage` conditioner takes (its middle frame by default).

    Args:
        thresholds: `JudgeThresholds` fields; probe: `probe.ProbeConfig` fields; cache_dir: where probes are kept.
    """

    def __init__(self, thresholds: Mapping[str, float] | None = None, probe: Mapping[str, Any] | None = None,
                 cache_dir: str | None = None) -> None:
        self.thresholds = JudgeThresholds(**dict(thresholds or {}))
        self.probe_config, self.cache_dir = ProbeConfig(**dict(probe or {})), cache_dir
        self.probe, self.image, self.flags = None, None, {}

    def start(self, module: Any, trainer: Any) -> None:
        self.flags = {}
        self.image = next((c for c in getattr(module, "conditioners", {}).values() if hasattr(c, "frame_index")), None)
        self.probe = None
        if trainer is not None and trainer.datamodule is not None and not trainer.fast_dev_run:
            self.probe = probe_from_datamodule(trainer.datamodule, self.probe_config, self.cache_dir)

    def update(self, generated: torch.Tensor, batch: dict[str, Any], extras: dict[str, torch.Tensor]) -> None:
        if "video" not in batch or generated.shape[2] < 3:
            return
        n, frames = generated.shape[0], generated.shape[2]
        real = batch["video"][:n].float()
        index = (self.image.frame_index(frames, n, train=False) if self.image is not None
                 else torch.full((n,), frames // 2, dtype=torch.long))
        sticker = batch["image"][:n].float() if "image" in batch else real[torch.arange(n), :, index]
        fps = torch.as_tensor(batch.get("fps", 8.0)).flatten()[:n] if "fps" in batch else 8.0
        for kind, video in (("", generated.float()), ("real_", real)):
            relevance = clip_alignment(self.probe, video, list(batch["meta"])[:n], fps) if self.probe else None
            verdict = judge(video, sticker, index, relevance, self.thresholds)
            for name, value in verdict.items():
                if name == "pass" or name.endswith("_pass"):
                    self.flags.setdefault(f"judge_{kind}{name.removesuffix('_pass')}", []).append(value.float())

    def compute(self) -> dict[str, float]:
        return {name: float(torch.cat(values).mean()) for name, values in self.flags.items()}
