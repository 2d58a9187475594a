"""Animated Stickers' ensemble of teachers with a human in the loop (arXiv 2402.06088), as `task=ensemble`.

    for each teacher k (a checkpoint of the sticker model, trained by its own recipe):
        for each (sticker, prompt) of the pool, for each seed:   clip = teacher_k(sticker, prompt, seed)
    scores  = judges(clip): motion, temporal consistency, looping, identity with the sticker, prompt relevance
    gallery = index.html (the clips and their scores) + labels.csv (a person fills `keep`) + grid.png (the first
              four stickers → animations of each teacher)
    kept    = a person's label where present, else the judges' verdict
    the kept clips → WebDataset shards (mp4 + sticker.png + caption + json), the student's training set

The pool is the datamodule's held-out sticker clips: the sticker is a clip's middle frame, the prompt its
caption. Prompt relevance is the trustworthy evaluator's: a probe trained on the datamodule's real clips reads
colour, shape and background (`evaluation.probe.clip_alignment`). Each teacher's pass rates per judge go to
MLflow as ensemble/<teacher>/<judge>, the real clips' as ensemble/real/<judge> (the ceiling). Run it again with
`ensemble.labels=<the edited labels.csv>` to select by a person's labels: generation is seeded, so the same clips
come back.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch

from datamodules.media import encode_frames, encode_image, to_uint8_frames
from datamodules.synthetic.world import motion_bucket, motion_score
from datamodules.write_shards import ShardSink
from lightning_modules.checkpoint_io import newest_checkpoint, read_module_state
from lightning_modules.evaluation import sticker_judges as judges
from lightning_modules.evaluation.probe import ProbeConfig, clip_alignment, probe_from_datamodule
from lightning_modules.evaluation.samples import log_artifacts
from lightning_modules.generation import GenerationModule


class TeacherEnsemble:
    """See the module docstring. `GenerationModule.run_task("ensemble")` builds it from the config's `ensemble`.

    Args:
        model: the sticker model's architecture (a `GenerationModule`); each teacher's weights are loaded into it.
        teachers: name → {"checkpoint": a checkpoint or a folder (its newest last.ckpt), "frame": the clip frame
            the teacher was conditioned on, first | middle (where the sticker should appear)}.
        pool: (sticker, prompt) pairs taken from the held-out clips; seeds: clips per pair and teacher.
        steps: solver steps; output_dir: where the gallery and the selected shards go (default: the run dir).
        labels: a labels.csv a person edited (None: the judges decide alone).
        thresholds: `sticker_judges.JudgeThresholds` fields; probe: `probe.ProbeConfig` fields, probe_cache.
    """

    def __init__(self, model: GenerationModule, teachers: Mapping[str, Mapping[str, Any]], pool: int = 16,
                 seeds: int = 2, steps: int = 50, output_dir: str | None = None, labels: str | None = None,
                 thresholds: Mapping[str, float] | None = None, probe: Mapping[str, Any] | None = None,
                 probe_cache: str | None = None) -> None:
        if not teachers:
            raise ValueError("ensemble.teachers is empty: name at least one teacher checkpoint")
        for name, teacher in teachers.items():
            if set(teacher) - {"checkpoint", "frame"} or "checkpoint" not in teacher:
                raise ValueError(f"ensemble.teachers.{name}: give checkpoint (and frame), got {sorted(teacher)}")
            if teacher.get("frame", "middle") not in ("first", "middle"):
                raise ValueError(f"ensemble.teachers.{name}.frame={teacher['frame']!r}; choose first or middle")
        self.model = model
        self.teachers = {name: dict(t) for name, t in teachers.items()}
        self.pool, self.seeds, self.steps = int(pool), int(seeds), int(steps)
        self.output_dir, self.labels = output_dir, labels
        self.thresholds = judges.JudgeThresholds(**dict(thresholds or {}))
        self.probe_config, self.probe_cache = ProbeConfig(**dict(probe or {})), probe_cache

    def pool_batch(self, datamodule: L.LightningDataModule) -> dict[str, Any]:
        """The first `pool` held-out clips as one batch, with "image" = each clip's middle frame (the sticker)."""
        datamodule.setup("validate")
        parts: dict[str, list] = {"video": [], "text": [], "fps": [], "meta": []}
        for batch in datamodule.val_dataloader():
            for key in parts:
                parts[key] += list(batch[key])
            if len(parts["text"]) >= self.pool:
                break
        if not parts["text"]:
            raise ValueError("task=ensemble: the datamodule's validation split holds no clips")
        n = min(self.pool, len(parts["text"]))
        video = torch.stack(parts["video"][:n]).float()
        return {"video": video, "image": video[:, :, video.shape[2] // 2], "text": parts["text"][:n],
                "fps": torch.stack(parts["fps"][:n]).float(), "meta": parts["meta"][:n],
                "key": [f"pool{i:03d}" for i in range(n)]}

    @torch.no_grad()
    def candidates(self, pool: dict[str, Any], wiring_check: bool = False
                   ) -> tuple[list[judges.Candidate], list[dict], torch.Tensor]:
        """Every teacher's clips for every (sticker, prompt) and seed: the candidates, their source metas, and
        the index of the frame each should show the sticker in. A `wiring_check` (fast_dev_run) tolerates a
        missing teacher checkpoint and samples the untrained model instead."""
        found, metas, frames = [], [], []
        n, (t, h, w) = len(pool["text"]), pool["video"].shape[2:]
        for name, teacher in self.teachers.items():
            try:
                path = newest_checkpoint(teacher["checkpoint"])
                self.model.load_state_dict(read_module_state(path, ema=True))
            except FileNotFoundError:
                if not wiring_check:
                    raise
                path = "untrained weights (fast_dev_run: no checkpoint)"
            self.model.eval()
            frame = 0 if teacher.get("frame") == "first" else t // 2
            print(f"[ensemble] teacher {name}: {path}")
            for seed in range(self.seeds):
                clips = self.model.generate(pool, t, h, w, steps=self.steps, seed=1000 * seed)
                for i in range(n):
                    found.append(judges.Candidate(f"{name}-{pool['key'][i]}-s{seed}", name, pool["text"][i],
                                                  pool["image"][i], clips[i], float(pool["fps"][i])))
                    metas.append(pool["meta"][i])
                    frames.append(frame)
        return found, metas, torch.tensor(frames)

    def judge(self, videos: torch.Tensor, stickers: torch.Tensor, frames: torch.Tensor, metas: list[dict],
              fps: torch.Tensor, probe: Any) -> dict[str, torch.Tensor]:
        relevance = clip_alignment(probe, videos, metas, fps) if probe is not None else None
        return judges.judge(videos, stickers, frames, relevance, self.thresholds)

    def run(self, trainer: L.Trainer, datamodule: L.LightningDataModule) -> dict[str, float]:
        """The whole task (see the module docstring); returns the logged metrics."""
        folder = Path(self.output_dir) if self.output_dir else Path(trainer.default_root_dir) / "ensemble"
        if trainer.fast_dev_run:  # a wiring check: one pair, one seed, two steps, no probe
            self.pool, self.seeds, self.steps = 1, 1, 2
        pool = self.pool_batch(datamodule)
        probe = None if trainer.fast_dev_run else probe_from_datamodule(datamodule, self.probe_config,
                                                                           self.probe_cache)
        found, metas, frames = self.candidates(pool, wiring_check=bool(trainer.fast_dev_run))
        videos = torch.stack([c.video for c in found])
        scores = self.judge(videos, torch.stack([c.sticker for c in found]), frames, metas,
                            torch.tensor([c.fps for c in found]), probe)
        real = self.judge(pool["video"], pool["image"], torch.full((len(pool["text"]),), pool["video"].shape[2] // 2),
                          pool["meta"], pool["fps"], probe)
        for old in (folder / "gallery", folder / "selected"):  # a rerun replaces the last gallery and selection
            shutil.rmtree(old, ignore_errors=True)
        judges.write_gallery(folder / "gallery", found, scores)
        per_teacher = [[c for c in found if c.teacher == name][:4] for name in self.teachers]
        (folder / "gallery" / "grid.png").write_bytes(encode_image(judges.frame_grid(sum(per_teacher, []))))
        labels = judges.read_labels(self.labels) if self.labels else {}
        keys = [c.key for c in found]
        kept = set(judges.select(keys, scores["pass"], labels))
        summary = judges.selection_summary(keys, scores["pass"], labels)
        shards = self.write_selected(folder / "selected", [c for c in found if c.key in kept], metas, keys)
        rates = judges.pass_rates(judges.records(found, scores))
        rates["real"] = {name: float(real[f"{name}_pass"].float().mean()) for name in judges.SCORES
                         if f"{name}_pass" in real} | {"pass": float(real["pass"].float().mean())}
        metrics = {f"ensemble/{teacher}/{name}": value
                   for teacher, per in rates.items() for name, value in per.items()}
        metrics |= {f"ensemble/selection/{name}": float(value) for name, value in summary.items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=0)
        log_artifacts(trainer, sorted((folder / "gallery").iterdir()), "ensemble/gallery")
        print(f"[ensemble] {len(found)} candidates, {summary['kept']} kept ({summary['kept_by_label']} by labels); "
              f"gallery: {folder / 'gallery' / 'index.html'}; selected shards: {shards}")
        if not summary["kept"]:
            print("[ensemble] no clip was kept: the student has no selected set (train the teachers longer, or keep "
                  "clips by hand with ensemble.labels=)")
        for teacher, per in rates.items():
            print(f"[ensemble]   {teacher:>10}: " + ", ".join(f"{k} {v:.2f}" for k, v in per.items()))
        return metrics

    @staticmethod
    def write_selected(folder: Path, kept: list[judges.Candidate], metas: list[dict], keys: list[str]) -> Path:
        """The kept clips as shards the video datamodules read (`data.shards=<folder>`): mp4, sticker.png,
        caption and the source clip's json with this clip's size, teacher and motion bucket."""
        source = dict(zip(keys, metas))
        sink = ShardSink(folder, maxcount=256)
        for c in kept:
            frames = to_uint8_frames(c.video)
            t, h, w = frames.shape[:3]
            score = motion_score(frames)
            meta = {**source[c.key], "kind": "video", "width": w, "height": h, "fps": c.fps, "num_frames": t,
                    "duration": t / c.fps, "teacher": c.teacher, "caption": c.prompt, "motion_score": score,
                    "motion_bucket": motion_bucket(score)}
            sink.write({"__key__": c.key.replace("-", "_"), "mp4": encode_frames(frames, c.fps),
                        "sticker.png": encode_image(c.sticker), "txt": c.prompt,
                        "json": meta})
        sink.close()
        return folder
