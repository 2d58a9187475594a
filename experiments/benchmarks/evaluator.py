"""Evaluator benchmark: can the shapes-world evaluator be trusted? Its scores on REAL held-out clips (the ceiling a
model can reach), beside the floors (clips with shuffled frames, clips with noise added) and chance.

    python experiments/benchmarks/evaluator.py [--sizes 16 32] [--noise 0.3] [--extra 512] [--cache-dir DIR]

1. Builds (or reuses) t2v_tiny's world (conf/data/world/quickstart.yaml, turned, spinning, textured objects) under
   data/, as `experiment=t2v_tiny` does, and, with --extra N, N more held-out clips of the same world options under
   another seed (a tighter estimate than the quickstart's 64 held-out clips).
2. Per clip size (16x16: the quickstart's; 32x32: the other experiments'), 8 frames at 8 fps: trains the probe
   on the training clips (`probe_from_datamodule`, the quickstart's probe config; timed; --cache-dir reuses
   trained probes) and runs `ProbeEvaluator` and `WorldMeasures` with the held-out clips as "samples" in three
   variants: real (the ceiling), shuffled (each clip's frames in a random order) and noise (Gaussian noise of
   std --noise added in [-1, 1] units, clamped).
3. Prints a table and writes experiments/benchmarks/results/evaluator.json: per size and variant, the probe's
   alignment per attribute (shape, colour, motion, background), fd and fd_real_floor, the probe-free measures,
   and the chance levels (random ranking for the probe; for the motion classifier, 1/4 and the majority class).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from datamodules.synthetic.world import MOTIONS  # noqa: E402
from datamodules.video import VideoDataModule  # noqa: E402
from datamodules.write_shards import ensure_world, write_world  # noqa: E402
from lightning_modules.evaluation.probe import (  # noqa: E402
    ATTRIBUTES,
    ProbeConfig,
    ProbeEvaluator,
    attribute_targets,
    chance_alignment,
    probe_from_datamodule,
)
from lightning_modules.evaluation.world_measures import WorldMeasures  # noqa: E402

RESULTS = ROOT / "experiments" / "benchmarks" / "results" / "evaluator.json"
MEASURES = ("consistency_iou", "coherence_iou", "area_cv", "direction_cosine", "still_speed", "motion_accuracy",
            "background_flicker", "background_speckle", "off_palette")


def t2v_tiny_options() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(world options, datamodule options, probe options) of `experiment=t2v_tiny`, as run.py composes them."""
    from experiments.compose import compose_config

    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_config(["experiment=t2v_tiny"], Path(tmp))
        world = OmegaConf.to_container(cfg.data.world, resolve=True)
        data = {k: OmegaConf.to_container(cfg.data, resolve=False)[k] for k in ("sizes", "frames", "fps", "batch_size")}
        probe = OmegaConf.to_container(cfg.model.evaluators.probe, resolve=False)
    options = {k: probe[k] for k in ("width", "features", "steps", "lr") if k in probe}
    return world, data, options


def variants(video: torch.Tensor, noise: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """real, shuffled (frames of each clip permuted at random, never the identity) and noise (+ N(0, noise²))."""
    t = video.shape[2]
    shuffled = torch.empty_like(video)
    for i in range(video.shape[0]):
        order = torch.randperm(t, generator=generator)
        while t > 1 and torch.equal(order, torch.arange(t)):
            order = torch.randperm(t, generator=generator)
        shuffled[i] = video[i][:, order]
    noisy = (video + noise * torch.randn(video.shape, generator=generator)).clamp(-1, 1)
    return {"real": video, "shuffled": shuffled, "noise": noisy}


def held_out(world: Path, size: int, data: dict[str, Any]) -> list[dict[str, Any]]:
    """The held-out clips of a world at size x size (the quickstart's frames and fps), as batches."""
    dm = VideoDataModule(shards=str(world / "scenes" / "train"), val_shards=str(world / "scenes" / "val"),
                         sizes=[[size, size]], frames=data["frames"], fps=data["fps"], batch_size=data["batch_size"],
                         num_workers=0, seed=0)
    dm.setup("validate")
    return list(dm.val_dataloader())


def run_size(world: Path, extra: Path | None, size: int, data: dict[str, Any], probe_options: dict[str, Any],
             noise: float, cache_dir: str) -> dict[str, Any]:
    dm = VideoDataModule(shards=str(world / "scenes" / "train"), val_shards=str(world / "scenes" / "val"),
                         sizes=[[size, size]], frames=data["frames"], fps=data["fps"], batch_size=data["batch_size"],
                         num_workers=0, seed=0)
    cached = set(Path(cache_dir).glob("probe-*.pt"))
    start = time.perf_counter()
    cpu = time.process_time()
    probe_from_datamodule(dm, ProbeConfig(**probe_options), cache_dir)  # trains (and caches) the probe
    train_seconds, train_cpu = time.perf_counter() - start, time.process_time() - cpu
    trained = set(Path(cache_dir).glob("probe-*.pt")) != cached
    evaluator = ProbeEvaluator(cache_dir=cache_dir, **probe_options)
    trainer = SimpleNamespace(datamodule=dm, fast_dev_run=False)
    module = SimpleNamespace(device=torch.device("cpu"))
    result: dict[str, Any] = {"probe_trained_here": trained, "probe_train_seconds": train_seconds,
                              "probe_train_cpu_seconds": train_cpu}
    sets = {"quickstart_val": held_out(world, size, data)}
    if extra is not None:
        sets["extra_val"] = held_out(extra, size, data)
    for name, batches in sets.items():
        generator = torch.Generator().manual_seed(0)
        metas = [m for b in batches for m in b["meta"]]
        targets = attribute_targets(metas)
        motions = Counter(o["motion"] for m in metas for o in m["objects"])
        entry: dict[str, Any] = {
            "clips": len(metas),
            "chance": {
                "alignment": chance_alignment(targets),
                "motion_accuracy_uniform": 1.0 / len(MOTIONS),
                "motion_accuracy_majority": max(motions.values()) / sum(motions.values()),
            },
        }
        split = [variants(b["video"], noise, generator) for b in batches]
        for variant in ("real", "shuffled", "noise"):
            evaluator.start(module, trainer)
            measures = WorldMeasures()
            measures.start(module, trainer)
            t0 = time.perf_counter()
            for batch, clips in zip(batches, split):
                evaluator.update(clips[variant], batch, {})
                measures.add(clips[variant], batch["meta"], batch["fps"])
            probe_scores = evaluator.compute()
            entry[variant] = {
                "alignment": {a: probe_scores.get(f"alignment_{a}") for a in ATTRIBUTES},
                "fd": probe_scores.get("fd"),
                "fd_real_floor": probe_scores.get("fd_real_floor"),
                "fd_samples": probe_scores.get("fd_samples"),
                "measures": measures.compute(),
                "seconds": time.perf_counter() - t0,
            }
        result[name] = entry
    return result


def table(results: dict[str, Any]) -> str:
    lines = []
    for size, result in results["sizes"].items():
        lines.append(f"== {size}x{size}, 8 frames: probe trained in {result['probe_train_seconds']:.0f} s "
                     f"({result['probe_train_cpu_seconds']:.0f} CPU s)")
        for name in ("quickstart_val", "extra_val"):
            if name not in result:
                continue
            entry = result[name]
            lines.append(f"-- {name} ({entry['clips']} held-out clips)")
            lines.append(f"{'':<22}{'real':>9}{'shuffled':>10}{'noise':>9}{'chance':>9}")
            for a in ATTRIBUTES:
                row = [entry[v]["alignment"][a] for v in ("real", "shuffled", "noise")]
                chance = entry["chance"]["alignment"].get(a)
                lines.append(f"{'probe ' + a:<22}" + "".join(f"{x:>9.3f}" if x is not None else f"{'-':>9}"
                                                              for x in row) + f"{chance:>10.3f}")
            row = [entry[v]["fd"] for v in ("real", "shuffled", "noise")]
            lines.append(f"{'fd (vs held-out)':<22}" + "".join(f"{x:>9.2f}" for x in row)
                         + f"   floor {entry['real']['fd_real_floor']:.2f} (n={entry['real']['fd_samples']:.0f})")
            for m in MEASURES:
                row = [entry[v]["measures"].get(m) for v in ("real", "shuffled", "noise")]
                extra = ""
                if m == "motion_accuracy":
                    extra = f"{entry['chance']['motion_accuracy_majority']:>10.3f}"
                lines.append(f"{m:<22}" + "".join(f"{x:>9.3f}" if x is not None else f"{'-':>9}" for x in row)
                             + extra)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--noise", type=float, default=0.3, help="std of the noise added, in [-1, 1] units")
    parser.add_argument("--extra", type=int, default=512, help="more held-out clips (another seed); 0: none")
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("DATA_DIR", ROOT / "data")))
    parser.add_argument("--cache-dir", default=None, help="reuse trained probes from here (default: train anew)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    world_options, data, probe_options = t2v_tiny_options()
    start = time.perf_counter()
    world = ensure_world(args.data_dir, world_options, progress=False)
    extra = None
    if args.extra:
        options = {**world_options, "seed": int(world_options.get("seed", 0)) + 1000,
                   "scenes": [1, args.extra]}
        extra = args.data_dir / "evaluator_benchmark" / f"extra-{args.extra}"
        if not (extra / "world.json").is_file():
            write_world(extra, options, kinds=["scenes"], progress=False)
    world_seconds = time.perf_counter() - start
    results: dict[str, Any] = {
        "world": {"options": world_options, "path": str(world), "extra_clips": args.extra,
                  "seconds": world_seconds},
        "noise_std": args.noise,
        "probe": probe_options,
        "sizes": {},
        "machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg(), "python": platform.python_version(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
    }
    with tempfile.TemporaryDirectory() as tmp:  # without --cache-dir: train anew, once per size
        for size in args.sizes:
            results["sizes"][str(size)] = run_size(world, extra, size, data, probe_options, args.noise,
                                                   args.cache_dir or tmp)
    print(table(results))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
