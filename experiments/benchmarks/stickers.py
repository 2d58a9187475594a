"""Animated Stickers side by side: the teachers, the ensemble's selection and the fast student, by the same judges on
the same (sticker, prompt) pool.

    python experiments/run.py experiment=sticker_ensemble && python experiments/run.py experiment=sticker_student_base \
        && python experiments/run.py experiment=sticker_student      # the chain's last steps (README)
    python experiments/benchmarks/stickers.py [--student <checkpoint or folder>] [--start <checkpoint or folder>] \
        [key=value ...]                                                # Hydra overrides of the student's config

The teachers' and the ensemble's rows are read from the ensemble's labels.csv (`ensemble.output_dir`/gallery):
each teacher's clips and their judges' verdicts (a person's `keep` wins where filled). A (sticker, prompt) pair
passes for the ensemble when any of its clips (every teacher, every seed) is kept: the selected set's pass rate
per pair. The student (newest `experiment=sticker_student` checkpoint) animates the same pool with the same seeds
as the teachers, 8 steps x 1 pass at its configured guidance, and is judged by the same judges and probe
(`lightning_modules.stickers.TeacherEnsemble`, with the student as its one "teacher"). Its start
(`experiment=sticker_student_base`, the student's teacher) is judged too, with the slow sampler: 50 steps x 3
passes. The student should keep >= 90% of the ensemble's pass rate per pair.

Writes experiments/benchmarks/results/stickers.json and stickers_grid.png (the first stickers: the real clip,
then the student's, each row the sticker and its 8 frames).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

import hydra  # noqa: E402
import torch  # noqa: E402

from datamodules.media import encode_image  # noqa: E402
from experiments.compose import compose_config  # noqa: E402
from lightning_modules.checkpoint_io import newest_checkpoint  # noqa: E402
from lightning_modules.evaluation import sticker_judges as judges  # noqa: E402
from lightning_modules.evaluation.probe import ProbeConfig, probe_from_datamodule  # noqa: E402
from lightning_modules.stickers import TeacherEnsemble  # noqa: E402

RESULTS = ROOT / "experiments/benchmarks/results"
TARGET = 0.9  # the student's pass rate over the ensemble's, per pair


def ensemble_rates(labels_csv: Path) -> dict[str, Any]:
    """Per teacher: the share of its clips kept; the ensemble: the share of pairs with a kept clip (a `keep`
    label wins over `judge_pass`), and the kept clips' count."""
    with open(labels_csv, newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    kept = set(judges.select([r["key"] for r in rows], [bool(int(r["judge_pass"])) for r in rows],
                             judges.read_labels(labels_csv)))
    kept_by_teacher: dict[str, list[bool]] = defaultdict(list)
    pair_kept: dict[str, bool] = defaultdict(bool)
    for row in rows:
        kept_by_teacher[row["teacher"]].append(row["key"] in kept)
        pair_kept[row["key"].split("-")[1]] |= row["key"] in kept  # <teacher>-pool<i>-s<seed>
    clips = sum(len(v) for v in kept_by_teacher.values())
    return {"teachers": {t: sum(v) / len(v) for t, v in kept_by_teacher.items()},
            "ensemble_per_pair": sum(pair_kept.values()) / len(pair_kept), "pairs": len(pair_kept),
            "kept_clips": sum(sum(v) for v in kept_by_teacher.values()), "clips": clips}


def runner(experiment: str, checkpoint: Path | None, name: str, steps: int, ensemble_cfg: Any,
           output_dir: Path, overrides: list[str]) -> TeacherEnsemble:
    """The ensemble's pool, seeds and judges with one "teacher": `experiment`'s model (with `overrides`) and
    `checkpoint`'s weights."""
    cfg = compose_config([f"experiment={experiment}", *overrides, "model.init_from=null", "model.evaluators=null"],
                         output_dir)
    model = hydra.utils.instantiate(cfg.model, _convert_="object")
    return TeacherEnsemble(model, {name: {"checkpoint": str(checkpoint), "frame": "middle"}},
                           pool=int(ensemble_cfg.pool), seeds=int(ensemble_cfg.seeds), steps=steps,
                           thresholds=dict(ensemble_cfg.thresholds))


def judge_model(runner: TeacherEnsemble, pool: dict[str, Any], probe: Any
                ) -> tuple[dict[str, float], list[judges.Candidate]]:
    """The runner's model animates the pool with the ensemble's seeds: its pass rates per judge, per clip, and per
    pair (any of its seeds passes), and its clips."""
    (name,) = runner.teachers
    found, metas, frames = runner.candidates(pool)
    scores = runner.judge(torch.stack([c.video for c in found]), torch.stack([c.sticker for c in found]), frames,
                          metas, torch.tensor([c.fps for c in found]), probe)
    rates = judges.pass_rates(judges.records(found, scores))[name]
    per_pair = scores["pass"].reshape(runner.seeds, -1).any(dim=0).float().mean()
    return rates | {"pass_per_pair": float(per_pair)}, found


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    outputs = Path(os.environ.get("OUTPUT_DIR", ROOT / "outputs"))
    parser.add_argument("--student", default=str(outputs / "sticker_student"))
    parser.add_argument("--start", default=str(outputs / "sticker_student_base"),
                        help="the student's start (its teacher); 'none' skips it")
    parser.add_argument("--labels", default=None, help="the ensemble's labels.csv (default: its gallery's)")
    parser.add_argument("--grid", type=int, default=6, help="stickers in the grid")
    parser.add_argument("--name", default="stickers", help="results file stem")
    args, overrides = parser.parse_known_args(argv)
    torch.set_num_threads(1)
    started = time.time()

    ens = compose_config(["experiment=sticker_ensemble"], outputs / "benchmark")
    labels = Path(args.labels or Path(ens.ensemble.output_dir) / "gallery" / "labels.csv")
    if not labels.is_file():
        raise SystemExit(f"{labels}: no ensemble gallery; run `python experiments/run.py experiment=sticker_ensemble`")
    report: dict[str, Any] = {"labels": str(labels), "student_overrides": overrides, **ensemble_rates(labels)}
    datamodule = hydra.utils.instantiate(ens.data, _convert_="object")
    probe = probe_from_datamodule(datamodule, ProbeConfig(**dict(ens.ensemble.probe)), ens.ensemble.probe_cache)

    models = [("student", "sticker_student", args.student, 8, overrides)]
    if args.start != "none":
        models.append(("student_start_50x3", "sticker_student_base", args.start, 50, []))
    found, pool = {}, None
    for name, experiment, path, steps, options in models:
        checkpoint = newest_checkpoint(path)
        judged = runner(experiment, checkpoint, name, steps, ens.ensemble, outputs / "benchmark", options)
        if pool is None:  # the ensemble's pool: its first held-out stickers with their captions
            pool = judged.pool_batch(datamodule)
            middle = torch.full((len(pool["text"]),), pool["video"].shape[2] // 2)
            real = judged.judge(pool["video"], pool["image"], middle, pool["meta"], pool["fps"], probe)
            report["real_clips"] = float(real["pass"].float().mean())
        rates, found[name] = judge_model(judged, pool, probe)
        step = torch.load(checkpoint, map_location="cpu", weights_only=True).get("global_step")
        report[name] = {"checkpoint": str(checkpoint), "trained_steps": step, "sampler_steps": steps, **rates}
    report["student_over_ensemble"] = report["student"]["pass"] / report["ensemble_per_pair"]
    report["target"], report["target_met"] = TARGET, report["student_over_ensemble"] >= TARGET
    report["seconds"] = time.time() - started

    n = min(args.grid, len(pool["text"]))
    rows = []
    for i in range(n):
        rows.append(judges.Candidate(f"real{i}", "real", pool["text"][i], pool["image"][i], pool["video"][i]))
        rows.append(found["student"][i])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}_grid.png").write_bytes(encode_image(judges.frame_grid(rows)))
    (RESULTS / f"{args.name}.json").write_text(json.dumps(report, indent=1))

    print(f"{report['pairs']} held-out (sticker, prompt) pairs, {int(ens.ensemble.seeds)} seeds; all judges pass:")
    print(f"{'':<34}{'per clip':>10}{'per pair':>10}")
    print(f"{'real clips (ceiling)':<34}{report['real_clips']:>10.2f}")
    for teacher, rate in report["teachers"].items():
        print(f"{'teacher ' + teacher:<34}{rate:>10.2f}")
    print(f"{'ensemble selection':<34}{'':>10}{report['ensemble_per_pair']:>10.2f}"
          f"   ({report['kept_clips']} of {report['clips']} clips kept)")
    for name, *_ in models:
        r = report[name]
        print(f"{name + ' (' + str(r['sampler_steps']) + ' steps)':<34}{r['pass']:>10.2f}{r['pass_per_pair']:>10.2f}"
              f"   trained {r['trained_steps']} steps")
    print(f"student / ensemble per pair: {report['student_over_ensemble']:.0%} (target {TARGET:.0%}: "
          f"{'met' if report['target_met'] else 'NOT met'}); {report['seconds']:.0f} s")
    return report


if __name__ == "__main__":
    main()
