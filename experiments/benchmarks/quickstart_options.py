"""One row of the quickstart options table: run the quickstart with some overrides, time it, read its test metrics.

    python experiments/benchmarks/quickstart_options.py NAME [--steps 500] [key=value ...]

runs `python experiments/run.py experiment=quickstart trainer.max_steps=STEPS run_name=NAME-STEPS <overrides>`
(`--experiment E`: experiment=E instead)
(world, training, sampling of the 64 held-out prompts and the evaluators) in its own output folder
(/tmp/quickstart_options/NAME-STEPS: its own MLflow store; the world and the probe come from data/), measures
its wall time and the load average, reads the test-stage metrics from the run's MLflow store and writes
(replaces) the row NAME/STEPS of experiments/benchmarks/results/quickstart_options.json. `--steps 0` keeps the
experiment's own length. `--evaluate CKPT` instead re-samples and re-scores a finished run's checkpoint with the
overrides (`task=evaluate`: sampling options such as the guidance scale or the solver steps; the run's own
training overrides must be repeated) and reads its eval/* metrics. The row's figures:

    colour, shape, motion, background   test/alignment_<a> (the probe's accuracy on samples), beside _real
    consistency_vs_real                 the worst of consistency_iou_real / consistency_iou,
                                        coherence_iou_real / coherence_iou and area_cv / area_cv_real
                                        (1 = as consistent as real clips; the target is <= 1.5)
    speckle                             background_speckle (beside _real), fd (beside fd_real_floor)
    off_palette                         the share of pixels that are no blend of the prompt's colours (beside _real)
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "experiments" / "benchmarks" / "results" / "quickstart_options.json"
ATTRIBUTES = ("colour", "shape", "motion", "background")


def test_metrics(store: Path, run_name: str, prefix: str = "test/") -> dict[str, float]:
    """The last value of every <prefix>* metric of the run named `run_name` in the MLflow sqlite store."""
    with sqlite3.connect(store) as db:
        (run_id,) = db.execute(
            "SELECT run_uuid FROM runs WHERE name = ? ORDER BY start_time DESC LIMIT 1", (run_name,)).fetchone()
        rows = db.execute("SELECT key, value FROM latest_metrics WHERE run_uuid = ? AND key LIKE ?",
                          (run_id, prefix + "%")).fetchall()
    return {key.removeprefix(prefix): float(value) for key, value in rows}


def summarise(metrics: dict[str, float]) -> dict[str, Any]:
    """The table's figures from the test metrics (see the module docstring)."""
    row: dict[str, Any] = {}
    for a in ATTRIBUTES:
        row[a] = metrics.get(f"alignment_{a}")
        row[f"{a}_real"] = metrics.get(f"alignment_real_{a}")
    ratios = {}
    for name in ("consistency_iou", "coherence_iou"):
        if metrics.get(name):
            ratios[name] = metrics[f"{name}_real"] / metrics[name]
    if metrics.get("area_cv_real"):
        ratios["area_cv"] = metrics["area_cv"] / metrics["area_cv_real"]
    row["consistency_vs_real"] = max(ratios.values()) if ratios else None
    row["consistency_ratios"] = ratios
    for name in ("background_speckle", "background_flicker", "off_palette", "motion_accuracy", "direction_cosine"):
        row[name.removeprefix("background_")] = metrics.get(name)
        row[f"{name.removeprefix('background_')}_real"] = metrics.get(f"{name}_real")
    row["fd"], row["fd_real_floor"] = metrics.get("fd"), metrics.get("fd_real_floor")
    row["metrics"] = metrics
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name")
    parser.add_argument("--steps", type=int, default=500, help="trainer.max_steps (0: the experiment's)")
    parser.add_argument("--note", default="")
    parser.add_argument("--evaluate", default=None, help="a checkpoint: task=evaluate on it instead of training")
    parser.add_argument("--experiment", default="quickstart", help="the experiment the overrides apply to")
    args, overrides = parser.parse_known_args(argv)
    args.overrides = overrides
    run_name = f"{args.name}-{args.steps}"
    output = Path("/tmp/quickstart_options") / run_name
    command = [sys.executable, "experiments/run.py", f"experiment={args.experiment}", f"run_name={run_name}",
               *([f"trainer.max_steps={args.steps}"] if args.steps else []), *args.overrides]
    if args.evaluate:
        command += ["task=evaluate", f"ckpt_path={args.evaluate}"]
    load_before = os.getloadavg()
    start = time.perf_counter()
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output.with_suffix(".log"), "w") as log:
        subprocess.run(command, cwd=ROOT, env={**os.environ, "OUTPUT_DIR": str(output)}, stdout=log,
                       stderr=subprocess.STDOUT, check=True)
    wall = time.perf_counter() - start
    row = {"option": args.name, "note": args.note, "steps": args.steps or None, "experiment": args.experiment,
           "overrides": args.overrides + ([f"task=evaluate ckpt_path={args.evaluate}"] if args.evaluate else []),
           "wall_s": round(wall, 1), "load_avg_start": [round(x, 2) for x in load_before],
           "load_avg_end": [round(x, 2) for x in os.getloadavg()],
           **summarise(test_metrics(output / "mlflow.db", run_name, "eval/" if args.evaluate else "test/"))}
    rows = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    rows = [r for r in rows if (r["option"], r["steps"]) != (row["option"], row["steps"])] + [row]
    RESULTS.write_text(json.dumps(rows, indent=1) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k not in ("metrics", "consistency_ratios")}, indent=1))
    return row


if __name__ == "__main__":
    main()
