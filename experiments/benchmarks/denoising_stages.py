"""Where along the flow does a text-to-video run lose each attribute? The evaluator's scores on the held-out clips
as they come back from each stage of generation:

    real clips                 the evaluator's ceiling
    codec                      Dec(Enc(x)): the most any generator over this codec can reach
    from t0 = 0.8, 0.6, ...    SDEdit with the clip's true caption: its latent noised to flow time t0
                               (0 = noise, 1 = data), then the run's solver and guidance from t0 to 1
    from t0 = 0 (samples)      text-to-video: what the test loop scores

An attribute that survives from t0 = 0.8 but not from t0 = 0.4 is lost while the run forms it at middle times;
one already lost from t0 = 0.8 is spoilt by the last, low-noise steps (a training time sampler shifted towards
noise hardly trains them).

    python experiments/benchmarks/denoising_stages.py [run=<run folder or checkpoint>] [--starts 0.8 0.6 0.4 0.2 0]
                                                      [key=value ...]

`run` defaults to the newest quickstart run (its own overrides and EMA weights, as experiments/quickstart_grid.py
loads them). Prints a table and writes experiments/benchmarks/results/denoising_stages.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from experiments.quickstart_grid import load_run, run_checkpoint  # noqa: E402
from lightning_modules.editing import sdedit  # noqa: E402

RESULTS = ROOT / "experiments" / "benchmarks" / "results" / "denoising_stages.json"
COLUMNS = ("alignment_colour", "alignment_shape", "alignment_motion", "alignment_background", "motion_accuracy",
           "consistency_iou", "area_cv", "background_speckle", "fd")


@torch.no_grad()
def stage_clips(module: Any, batch: dict[str, Any], start: float | None, seed: int = 0) -> torch.Tensor:
    """The batch's clips [B, 3, T, H, W] after one stage: encoded and decoded (start None), or SDEdit from flow
    time `start` with the batch's captions (0: plain text-to-video)."""
    video = batch["video"].float()
    if start is None:
        return module.from_latent(module.to_latent(batch), video.shape[2]).clamp(-1, 1)
    return sdedit(module, video, list(batch["text"]), batch["fps"], strength=1.0 - start, seed=seed)


def evaluate(module: Any, datamodule: Any, starts: list[float]) -> dict[str, dict[str, float]]:
    """Row name → the evaluators' metrics over every held-out batch, from "real clips" (the evaluators' ceiling)
    and "codec" down to "from t0=0" (text-to-video)."""
    trainer = SimpleNamespace(datamodule=datamodule, fast_dev_run=False, is_global_zero=False)
    evaluators = [e for n, e in module.evaluators.items() if n in ("probe", "world")]
    batches = list(datamodule.val_dataloader())
    rows: dict[str, dict[str, float]] = {}
    for name, start in [("codec", None), *((f"from t0={t0:g}", t0) for t0 in starts)]:
        for e in evaluators:
            e.start(module, trainer)
        for i, batch in enumerate(batches):  # the test loop's seeds: from t0 = 0 are the run's test samples
            clips = stage_clips(module, batch, start, seed=module.test_seed(i))
            for e in evaluators:
                e.update(clips, batch, {})
        metrics = {k: v for e in evaluators for k, v in e.compute().items()}
        if not rows:  # the real clips' values come with every row: take them once
            rows["real clips"] = {c: metrics.get(c.replace("alignment_", "alignment_real_") if "alignment_" in c
                                                 else "fd_real_floor" if c == "fd" else f"{c}_real") for c in COLUMNS}
        rows[name] = {c: metrics.get(c) for c in COLUMNS}
        print(f"[denoising_stages] {name}: " + " ".join(f"{c}={v:.3f}" for c, v in rows[name].items()
                                                        if v is not None), flush=True)
    return rows


def table(rows: dict[str, dict[str, float]]) -> str:
    short = [c.replace("alignment_", "").replace("background_", "") for c in COLUMNS]
    lines = ["| clips | " + " | ".join(short) + " |", "|---|" + "---|" * len(COLUMNS)]
    for name, row in rows.items():
        cells = " | ".join("" if row[c] is None else f"{row[c]:.3f}" for c in COLUMNS)
        lines.append(f"| {name} | {cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--starts", type=float, nargs="+", default=[0.8, 0.6, 0.4, 0.2, 0.0],
                        help="flow times t0 in [0, 1) to start the solver from (0: text-to-video)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args, rest = parser.parse_known_args(argv)
    if any(not 0.0 <= t0 < 1.0 for t0 in args.starts):
        raise SystemExit(f"--starts {args.starts}: each start time must be in [0, 1)")
    run = next((o.split("=", 1)[1] for o in rest if o.startswith("run=")), None)
    ckpt, overrides = run_checkpoint(run)
    module, ema, _, datamodule = load_run(ckpt, overrides + [o for o in rest if not o.startswith("run=")],
                                          "denoising_stages")
    rows = evaluate(module, datamodule, args.starts)
    result = {"checkpoint": str(ckpt), "ema": ema, "overrides": overrides, "rows": rows}
    print(f"[denoising_stages] {ckpt} ({'EMA' if ema else 'raw'} weights)")
    print(table(rows))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1))
    print(f"[denoising_stages] wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
