"""Does a text-to-video run use each attribute of its prompts? The flow-matching loss on held-out clips under their
true captions, and under captions with one attribute swapped, per noise level.

    python experiments/benchmarks/text_sensitivity.py [run=<run folder or checkpoint>] [--seeds 4] [key=value ...]
    python experiments/benchmarks/text_sensitivity.py --train 800 --times 0 [key=value ...]

`run` defaults to the newest quickstart run (as `experiments/quickstart_grid.py`, whose loading this shares: the
run's own overrides, EMA weights). For every held-out clip of the first validation batch the caption is written
again from the clip's scene (its json) with one attribute of its first object, or its background colour, replaced
by another value of the world's (`swapped_caption`). At each flow time t the same noise is used for every caption,
so

    gap_a(t) = L(swapped a, t) − L(true, t)

is what knowing attribute a is worth to the model at t; "empty" is the empty prompt's gap, what the whole prompt is
worth. A gap near 0 means the model ignores the attribute: sampling cannot follow it, whatever the guidance.
Prints a table and writes experiments/benchmarks/results/text_sensitivity.json.

`--train STEPS` measures a model trained here instead of a run: `experiment=t2v_tiny` with the overrides, its
codec fitted, trained for STEPS steps in this process by Lightning's loop (its loss, time sampler, optimizer and
schedule; no EMA, no validation, no sampling), then the gaps (results/text_sensitivity_trained.json, one row per `--name`). A quick way to
compare how fast backbones learn what a word means: with `model.time_sampler.mean=-8 model.time_sampler.std=0.1`
and `--times 0` the model is trained and measured at t ~ 0 only, where it regresses the caption's mean clip and
the shape gap is the mean outline the shape word buys (~100 s for 800 steps).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import hydra  # noqa: E402
import lightning as L  # noqa: E402
import torch  # noqa: E402

from datamodules.synthetic.captions import scene_caption  # noqa: E402
from datamodules.synthetic.world import (  # noqa: E402
    BACKGROUND_COLOURS,
    MOTIONS,
    OBJECT_COLOURS,
    SHAPES,
    SceneSpec,
)
from experiments.compose import compose_config  # noqa: E402
from experiments.quickstart_grid import load_run, run_checkpoint  # noqa: E402
from lightning_modules.evaluation.probe import SHAPE_CLASS  # noqa: E402

RESULTS = ROOT / "experiments" / "benchmarks" / "results" / "text_sensitivity.json"
TRAINED = RESULTS.with_name("text_sensitivity_trained.json")
ATTRIBUTES = ("colour", "shape", "motion", "background")
TIMES = (0.1, 0.3, 0.5, 0.7, 0.9)


def swapped_caption(scene: SceneSpec, attribute: str, rng: random.Random) -> str:
    """The scene's caption with `attribute` (colour, shape or motion of its first object, or the background's
    first colour) replaced by another of the world's values, drawn with `rng`."""
    obj = scene.objects[0]
    if attribute == "background":
        colours = list(scene.background.colours)
        colours[0] = rng.choice([c for c in BACKGROUND_COLOURS if c not in colours])
        return scene_caption(replace(scene, background=replace(scene.background, colours=colours)))
    options = {"colour": list(OBJECT_COLOURS), "shape": list(SHAPES), "motion": list(MOTIONS)}[attribute]
    same = (lambda v: SHAPE_CLASS[v] == SHAPE_CLASS[obj.shape]) if attribute == "shape" else (
        lambda v: v == getattr(obj, attribute))  # a square turned by 45° is the world's diamond: one class
    value = rng.choice([v for v in options if not same(v)])
    changes: dict[str, Any] = {attribute: value}
    if attribute == "motion":
        changes["spin"] = 0.0  # "spins in place" is the still motion's caption for a spinning object
    return scene_caption(replace(scene, objects=[replace(obj, **changes), *scene.objects[1:]]))


def train_module(overrides: list[str], steps: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(`experiment=t2v_tiny` with `overrides`, trained `steps` steps in this process; its first validation
    batch). Lightning's own loop on the experiment's datamodule: the module's setup (a codec fitted on data is
    fitted there), optimizer, schedule and gradient clipping; no validation, callbacks, logger or checkpoints."""
    cfg = compose_config(["experiment=t2v_tiny", *overrides, f"trainer.max_steps={steps}"],
                         Path("/tmp") / "text_sensitivity")
    L.seed_everything(cfg.seed)
    module = hydra.utils.instantiate(cfg.model, _convert_="object")
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="object")
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, gradient_clip_val=cfg.trainer.gradient_clip_val,
                        limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule)
    module.eval()
    return module, next(iter(datamodule.val_dataloader()))


@torch.no_grad()
def sensitivity(module: torch.nn.Module, batch: dict[str, Any], seeds: int,
                times: tuple[float, ...] = TIMES) -> dict[str, Any]:
    """Per flow time: the loss under the true captions and each attribute's gap (and the empty prompt's)."""
    scenes = [SceneSpec.from_dict(m) for m in batch["meta"]]
    if not all(s.objects and s.background.kind in ("plain", "gradient") for s in scenes):
        raise ValueError("text_sensitivity needs clips with an object on a plain or gradient background")
    rng = random.Random(0)
    captions = {"true": list(batch["text"])}
    captions.update({a: [swapped_caption(s, a, rng) for s in scenes] for a in ATTRIBUTES})
    captions["empty"] = [""] * len(scenes)
    x1 = module.to_latent(batch)
    rows = []
    for t in times:
        losses = {name: 0.0 for name in captions}
        for seed in range(seeds):
            noise = module.objective.noise(tuple(x1.shape), torch.Generator().manual_seed(seed)).to(x1)
            times = torch.full((x1.shape[0],), t)
            for name, text in captions.items():
                losses[name] += module.loss({**batch, "text": text}, t=times, noise=noise).item() / seeds
        rows.append({"t": t, "loss": losses["true"],
                     "gap": {name: losses[name] - losses["true"] for name in captions if name != "true"}})
    return {"clips": len(scenes), "seeds": seeds, "example": {k: v[0] for k, v in captions.items()}, "times": rows}


def table(result: dict[str, Any]) -> str:
    names = [*ATTRIBUTES, "empty"]
    lines = ["| t | loss (true captions) | " + " | ".join(f"gap: {n}" for n in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for row in result["times"]:
        gaps = " | ".join(f"{row['gap'][n]:+.4f} ({100 * row['gap'][n] / row['loss']:+.1f}%)" for n in names)
        lines.append(f"| {row['t']:.1f} | {row['loss']:.4f} | {gaps} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="run=<folder or checkpoint>, then key=value overrides")
    parser.add_argument("--seeds", type=int, default=4, help="noise draws per flow time")
    parser.add_argument("--times", type=float, nargs="+", default=list(TIMES), help="flow times (0 = noise)")
    parser.add_argument("--train", type=int, default=0, help="train a model here for this many steps (no run=)")
    parser.add_argument("--name", default="default", help="the row of results/text_sensitivity_trained.json")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_intermixed_args()  # options and key=value overrides in any order
    times = tuple(args.times)
    run = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("run=")), None)
    overrides = [o for o in args.overrides if not o.startswith("run=")]
    if args.train and run:
        parser.error(f"--train trains its own model: drop run={run}")
    if args.train:
        start = time.perf_counter()
        module, batch = train_module(overrides, args.train)
        result = {"name": args.name, "steps": args.train, "overrides": overrides,
                  "train_s": round(time.perf_counter() - start, 1), **sensitivity(module, batch, args.seeds, times)}
        source = f"{args.train} steps trained here ({result['train_s']} s)"
    else:
        ckpt, run_overrides = run_checkpoint(run)
        module, _, batch, _ = load_run(ckpt, run_overrides + overrides, "text_sensitivity")
        result = {"checkpoint": str(ckpt), **sensitivity(module, batch, args.seeds, times)}
        source = str(ckpt)
    print(f"[text_sensitivity] {source}: {result['clips']} held-out clips, {args.seeds} noise draws per time")
    print(table(result))
    output = args.output or (TRAINED if args.train else RESULTS)
    output.parent.mkdir(parents=True, exist_ok=True)
    if args.train:  # one row per name, the others kept
        rows = json.loads(output.read_text()) if output.is_file() else {}
        rows[args.name] = result
        output.write_text(json.dumps(rows, indent=1))
    else:
        output.write_text(json.dumps(result, indent=1))
    print(f"[text_sensitivity] wrote {output}")


if __name__ == "__main__":
    main()
