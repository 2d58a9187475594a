"""Movie Gen personalization (PT2V) on held-out identities: identity, copy-paste and text alignment of the three
stages, beside the text-to-video model without a reference, real clips of the identity, and paired training.

    python experiments/benchmarks/pt2v.py [--t2v <t2v_tiny run folder or checkpoint>] [--t2v-steps 1000]
        [--steps 600 200 300] [--fresh] [--out <folder>] [key=value ...]

Hydra overrides after the options apply to every stage and to the evaluation, e.g. `model/codec=pca_clip` for the
chain on another codec.

The defaults are the experiments' own lengths (t2v_tiny's 1000 steps, the stages' 600 / 200 / 300): about
30 minutes on 2 CPU cores. `--t2v-steps 400 --steps 400 60 120` is the 10-minute version (weaker identity).

The chain, each stage from the previous one's newest checkpoint (`model.init_from`), in its own output folder
(default outputs/benchmarks/pt2v, with its own MLflow store; the worlds and the evaluators' networks come from data/):

    t2v             experiment=t2v_tiny (trained here for --t2v-steps unless --t2v names a finished run)
    stage1          experiment=pt2v_stage1: paired references, encoder frozen, 8 frames
    stage2          experiment=pt2v_stage2: 16 frames
    stage3_cross    experiment=pt2v_stage3: cross-paired references, encoder trainable (the paper's stage III)
    stage3_paired   the same from stage 2, on paired references (the ablation: what cross-pairing buys)

A stage whose checkpoint is in the folder is reused (--fresh trains every stage again). Every model samples the
same held-out clips of one object (the 12 identities no stage trained on) at 8 frames, with the same noise, at its
config's guidance (PT2V: reference 4, text 2; T2V: text 2), and stage3_cross once more with reference guidance 1;
the reference of each clip is a crop from another clip of its identity (cross, as a user's new photo would be),
and the captions do not name the identity (only the reference tells who it is). Scored
by `lightning_modules.evaluation.identity` (identity similarity and accuracy with an embedding trained on the
training identities; copy_pose and copy_size) and the probe (`evaluation.probe`: text alignment of shape, motion and
background; the identity clips' captions name no colour). Rows "real clips" (the ceiling: the held-out clip of the
prompt) and "other identity" (the floor: the real clip against another identity's reference) come from the same
evaluators. Writes experiments/benchmarks/results/pt2v.json and pt2v_grid.png (one clip of each of the first
identities: the reference, the real clip, then each model's sample). Timings of reused stages are those of loading.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

import hydra  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from callbacks.ema import load_ema_weights  # noqa: E402
from experiments.compose import compose_config  # noqa: E402
from experiments.quickstart_grid import caption_row, frames_row, stack_rows, tagged_row  # noqa: E402
from experiments.runner import run  # noqa: E402
from lightning_modules.checkpoint_io import newest_checkpoint, read_module_state  # noqa: E402
from lightning_modules.evaluation.identity import standard_error  # noqa: E402

RESULTS = ROOT / "experiments" / "benchmarks" / "results"
# name -> (experiment, extra overrides, the stage it starts from)
CHAIN = {
    "stage1": ("pt2v_stage1", [], "t2v"),
    "stage2": ("pt2v_stage2", [], "stage1"),
    "stage3_cross": ("pt2v_stage3", [], "stage2"),
    "stage3_paired": ("pt2v_stage3", ["data.reference=paired"], "stage2"),
}
NO_REF_GUIDANCE = "stage3_cross, s_ref = 1"
QUICK = ["callbacks.media=null", "test_after_fit=false", "trainer.enable_progress_bar=false"]


def train(name: str, experiment: str, overrides: list[str], init: Path | None, steps: int, out: Path,
          fresh: bool) -> Path:
    """The newest checkpoint of `name` under `out`, trained first (from `init`) unless there is one."""
    folder = out / name
    if not fresh:
        try:
            ckpt = newest_checkpoint(folder)
            print(f"[pt2v] {name}: reusing {ckpt}", flush=True)
            return ckpt
        except FileNotFoundError:
            pass
    start = time.time()
    options = [f"experiment={experiment}", f"experiment_name=pt2v_bench_{name}", f"trainer.max_steps={steps}",
               *QUICK, *overrides]
    if init is not None:
        options.append(f"model.init_from={init}")
    run(compose_config(options, folder / "run"))
    print(f"[pt2v] {name}: {steps} steps in {time.time() - start:.0f} s", flush=True)
    return newest_checkpoint(folder)


def evaluation_data(cfg: Any) -> tuple[Any, dict[str, Any]]:
    """(the datamodule, one batch of every held-out clip of one object, cross-paired, 8 frames)."""
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="object")
    datamodule.prepare_data()
    datamodule.setup("validate")
    parts = list(datamodule.val_dataloader())
    keep = [(b, i) for b in parts for i, m in enumerate(b["meta"]) if len(m["objects"]) == 1]
    batch = {"video": torch.stack([b["video"][i] for b, i in keep]),
             "reference": torch.stack([b["reference"][i] for b, i in keep]),
             "fps": torch.stack([b["fps"][i] for b, i in keep]),
             "text": [b["text"][i] for b, i in keep], "meta": [b["meta"][i] for b, i in keep],
             "reference_from": [b["reference_from"][i] for b, i in keep]}
    return datamodule, batch


def load(name: str, ckpt: Path, out: Path, overrides: Sequence[str] = ()) -> torch.nn.Module:
    """The model of row `name` (its stage's experiment; the text-to-video row without the reference conditioner)
    with the checkpoint's EMA weights."""
    experiment = CHAIN[name][0] if name in CHAIN else "pt2v_stage1"
    extra = ["model.conditioners.reference=null", "~model.sampler.guidance.reference",
             "model.sampler.guidance_order=null"] if name == "t2v" else []
    cfg = compose_config([f"experiment={experiment}", *extra, *overrides], out / "evaluate")
    module = hydra.utils.instantiate(cfg.model, _convert_="object")
    module.load_state_dict(read_module_state(ckpt))
    load_ema_weights(module, ckpt)
    return module.eval()


def score(evaluators: dict[str, Any], sample: torch.Tensor, batch: dict[str, Any]) -> dict[str, float]:
    """Every evaluator's metrics of one model's samples (their per-model state emptied first; the trained networks
    and the probe's real training features are kept)."""
    out: dict[str, float] = {}
    for e in evaluators.values():
        e.rows, e.scores = [], {}
        if getattr(e, "frechet", None) is not None:
            e.frechet.samples, e.frechet.real = [], []
        e.update(sample, batch, {})
        out.update(e.compute())
    return out


def summary(metrics: dict[str, float], real: bool = False) -> dict[str, float]:
    """The table's figures: identity similarity / accuracy, copy_pose / copy_size, text alignment (shape, motion,
    background and their mean)."""
    suffix = "_real" if real else ""
    row = {"identity_similarity": metrics[f"identity_similarity{suffix}"],
           "identity_accuracy": metrics[f"identity_accuracy{suffix}"],
           "copy_pose": metrics[f"copy_pose{suffix}"], "copy_size": metrics[f"copy_size{suffix}"],
           "identity_similarity_se": metrics[f"identity_similarity_se{suffix}"],
           "identity_accuracy_se": metrics[f"identity_accuracy_se{suffix}"]}
    probe = "alignment_real" if real else "alignment"
    for a in ("shape", "motion", "background"):
        row[a] = metrics.get(f"{probe}_{a}")
    present = [row[a] for a in ("shape", "motion", "background") if row[a] is not None]
    row["text_alignment"] = sum(present) / len(present) if present else None
    return row


def paired_difference(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error of a - b over clips [N] that share their prompt, reference and noise."""
    d = (a - b).float()
    return float(d.mean()), standard_error(d)


def grid(batch: dict[str, Any], samples: dict[str, torch.Tensor], count: int, scale: int = 4) -> Image.Image:
    """Per identity (its first clip, up to `count`): the reference, the real clip's frames, then each model's
    (labelled), scaled up `scale` times."""
    names = ["real", *samples]
    rows = []
    first_of_identity = {}
    for i, meta in enumerate(batch["meta"]):
        first_of_identity.setdefault(meta["identity"], i)
    for i in list(first_of_identity.values())[:count]:  # one clip of each of the first identities
        reference = batch["reference"][i][:, None]
        reference = torch.nn.functional.interpolate(reference.transpose(0, 1), size=batch["video"].shape[-2:],
                                                    mode="bilinear", antialias=True).transpose(0, 1)
        rows.append(caption_row(batch["text"][i][:110], 600))
        for name in names:
            clip = batch["video"][i] if name == "real" else samples[name][i]
            line = np.concatenate([frames_row(reference, scale), np.full((clip.shape[2] * scale, 8, 3), 255, np.uint8),
                                   frames_row(clip, scale)], axis=1) if name == "real" else np.concatenate(
                [np.full((clip.shape[2] * scale, clip.shape[3] * scale + 10, 3), 255, np.uint8),
                 frames_row(clip, scale)], axis=1)
            rows.append(tagged_row(name, line))
        rows.append(np.full((6, rows[-1].shape[1], 3), 255, np.uint8))
    return stack_rows(rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--t2v", default=None, help="a finished t2v_tiny run or checkpoint (default: train one)")
    parser.add_argument("--t2v-steps", type=int, default=1000)
    parser.add_argument("--steps", type=int, nargs=3, default=[600, 200, 300], metavar=("I", "II", "III"))
    parser.add_argument("--sampling-steps", type=int, default=25)
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "benchmarks" / "pt2v"))
    parser.add_argument("--grid", type=int, default=4)
    args, overrides = parser.parse_known_args(argv)  # the rest: Hydra overrides of every stage
    out = Path(args.out)
    os.environ["OUTPUT_DIR"] = str(out)  # every stage's runs, checkpoints and MLflow store
    torch.set_num_threads(1)
    started = time.time()

    timings = {}
    t0 = time.time()
    ckpts = {"t2v": newest_checkpoint(args.t2v) if args.t2v else train(
        "t2v", "t2v_tiny", overrides, None, args.t2v_steps, out, args.fresh)}
    timings["t2v"] = time.time() - t0
    steps = {"stage1": args.steps[0], "stage2": args.steps[1], "stage3_cross": args.steps[2],
             "stage3_paired": args.steps[2]}
    for name, (experiment, stage_overrides, parent) in CHAIN.items():
        t0 = time.time()
        ckpts[name] = train(name, experiment, [*stage_overrides, *overrides], ckpts[parent], steps[name], out,
                            args.fresh)
        timings[name] = time.time() - t0

    t0 = time.time()
    cfg = compose_config(["experiment=pt2v_stage1", "data.reference=cross", "data.batch_size=16",
                          "data.num_workers=0", *overrides], out / "evaluate")
    datamodule, batch = evaluation_data(cfg)
    trainer = SimpleNamespace(datamodule=datamodule, fast_dev_run=False)
    evaluators = {name: hydra.utils.instantiate(cfg.model.evaluators[name], _convert_="object")
                  for name in ("identity", "probe")}
    for e in evaluators.values():
        e.start(None, trainer)
    timings["evaluators"] = time.time() - t0
    print(f"[pt2v] {len(batch['text'])} held-out clips of {len({m['identity'] for m in batch['meta']})} identities",
          flush=True)

    rows: dict[str, dict[str, float]] = {}
    samples: dict[str, torch.Tensor] = {}
    metrics: dict[str, float] = {}
    per_clip: dict[str, dict[str, torch.Tensor]] = {}
    # every model at its config's guidance; the last stage also without guidance on the reference (s_ref = 1)
    variants = [(name, name, None) for name in ckpts] + [(NO_REF_GUIDANCE, "stage3_cross", 1.0)]
    for row, name, reference_scale in variants:
        t0 = time.time()
        module = load(name, ckpts[name], out, overrides)
        scales = dict(module.sampler.guidance) | ({"reference": reference_scale} if reference_scale else {})
        with torch.no_grad():
            samples[row] = module.generate(batch, 8, *batch["video"].shape[-2:], seed=0, steps=args.sampling_steps,
                                           guidance_scales=scales)
        metrics = score(evaluators, samples[row], batch)
        rows[row] = summary(metrics)
        per_clip[row] = evaluators["identity"].per_clip()
        timings[f"sample_{row}"] = time.time() - t0
    samples.pop(NO_REF_GUIDANCE)  # not in the grid
    rows["real clips (ceiling)"] = summary(metrics, real=True)
    rows["other identity (floor)"] = {"identity_similarity": metrics["identity_similarity_floor"],
                                      "identity_accuracy": metrics["identity_accuracy_chance"],
                                      "copy_pose": 0.0, "copy_size": 0.0}
    rows["reference pasted (full copy)"] = {"copy_pose": metrics["copy_pose_paste"], "copy_size": 1.0}

    columns = ["identity_similarity", "identity_accuracy", "copy_pose", "copy_size", "shape", "motion", "background",
               "text_alignment"]
    print(f"\n{'model':30s}" + "".join(f"{c[:14]:>15s}" for c in columns))
    for name, row in rows.items():
        print(f"{name:30s}" + "".join(f"{row[c]:15.3f}" if row.get(c) is not None else f"{'':15s}" for c in columns))
    differences = {key: paired_difference(per_clip["stage3_cross"][key], per_clip["stage3_paired"][key])
                   for key in ("similarity", "correct", "pose")}
    print("\nstage3_cross - stage3_paired, clip by clip (mean ± standard error): "
          + ", ".join(f"{k} {m:+.3f} ± {se:.3f}" for k, (m, se) in differences.items()))
    result = {"clips": len(batch["text"]), "identities": len({m["identity"] for m in batch["meta"]}),
              "steps": {"t2v": args.t2v_steps if not args.t2v else "given", **steps},
              "sampling_steps": args.sampling_steps, "rows": rows,
              "cross_minus_paired": {k: {"mean": m, "se": se} for k, (m, se) in differences.items()},
              "timings_s": {k: round(v, 1) for k, v in timings.items()},
              "total_s": round(time.time() - started, 1), "load_average": os.getloadavg()[0]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pt2v.json").write_text(json.dumps(result, indent=2) + "\n")
    grid(batch, samples, args.grid).save(RESULTS / "pt2v_grid.png")
    print(f"\n[pt2v] {result['total_s']:.0f} s -> {RESULTS / 'pt2v.json'}, {RESULTS / 'pt2v_grid.png'}")
    return result


if __name__ == "__main__":
    main()
