"""Movie Gen Edit on the world's held-out video edit pairs: the three stages beside an SDEdit baseline, the real
edited clip (the ceiling) and the unedited source (the "do nothing" floor).

    python experiments/run.py experiment=t2v_tiny            # the text-to-video model (also SDEdit's)
    python experiments/run.py experiment=edit_stage1 && python experiments/run.py experiment=edit_stage2 \
        && python experiments/run.py experiment=edit_stage3   # at the configs' lengths: 1000, 400, 200 steps
    python experiments/benchmarks/edit.py [--steps 20] [--strengths 0.5 0.75] [--stages edit_stage1 ...]
    python experiments/benchmarks/edit.py --base t2v_upright \
        --stages edit_upright_stage1 edit_upright_stage2 edit_upright_stage3 edit_upright_supervised \
        --held-out 320 --single-frame --name edit_upright_x4_320

Every model edits the same 64 held-out pairs (never trained on; recolour, replace, add, remove) with the same noise per
pair and the same solver steps, at its config's guidance (editors: source 1.5, text 2; T2V: text 2). SDEdit
(`lightning_modules.editing.sdedit`) noises the source latent to t_0 = 1 − strength with the base text-to-video
model (--base) and regenerates it with the instruction as the prompt, and once more with the target clip's
caption (what the text-to-video model was trained on: with the instruction it drifts from the source, 16 pairs at
strength 0.2 / 0.5 end 0.24 / 0.42 from it against 0.06 / 0.11 with a caption). "source via the codec" is the
source encoded and decoded by the base's codec, which the editors inherit: the most an editor that copies
what it should keep can preserve. Metrics
(`lightning_modules.evaluation.editing`): edit success (the probe reads the asked attribute; per kind too),
preservation (mean |g − x| outside the edited region, lower is better), temporal error (frame-to-frame change
against the real edited clip's, lower is better), each with its standard error, and the success's paired gain
over the unedited source ± its standard error (the same pairs, so their difficulty cancels). 64 pairs leave a
kind 9-22 of them (a standard error of 0.1-0.17); `--held-out 320` draws more from the same world (its first 64
are the world's own). `--single-frame` also edits each pair's first frame as an image (stage I's task) and scores it
held still: what the editors do without motion. Writes experiments/benchmarks/results/<name>.json and
<name>_grid.png (--name, default edit; first pairs: source, target, then each model's edit; frames left to right).
Checkpoints are the newest of each experiment under $OUTPUT_DIR (default outputs/); the json records each one's
trained steps beside its config's trainer.max_steps (and the run warns where they differ).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
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
from datamodules.edits import video_edit_batch  # noqa: E402
from experiments.compose import compose_config  # noqa: E402
from experiments.quickstart_grid import caption_row, frames_row, stack_rows, tagged_row  # noqa: E402
from lightning_modules.checkpoint_io import newest_checkpoint, read_module_state  # noqa: E402
from lightning_modules.editing import sdedit  # noqa: E402
from lightning_modules.evaluation.editing import ASKED, EditEvaluator  # noqa: E402
from lightning_modules.evaluation.probe import probe_from_datamodule  # noqa: E402

RESULTS = ROOT / "experiments" / "benchmarks" / "results"
OUTPUTS = Path(os.environ.get("OUTPUT_DIR", ROOT / "outputs"))
STEPS: dict[str, dict[str, Any]] = {}  # experiment -> its checkpoint's trained steps and config max_steps


def load(experiment: str, job: Path) -> tuple[torch.nn.Module, Path]:
    """The experiment's model with the newest checkpoint of its runs (EMA weights when it has them)."""
    ckpt = newest_checkpoint(OUTPUTS / experiment)
    cfg = compose_config([f"experiment={experiment}"], job / experiment)
    module = hydra.utils.instantiate(cfg.model, _convert_="object")
    module.load_state_dict(read_module_state(ckpt))
    load_ema_weights(module, ckpt)
    STEPS[experiment] = {"trained": trained_steps(ckpt), "max_steps": cfg.trainer.max_steps}
    if STEPS[experiment]["trained"] not in (None, cfg.trainer.max_steps):
        print(f"[edit] {experiment}: the checkpoint has {STEPS[experiment]['trained']} steps, its config "
              f"trainer.max_steps {cfg.trainer.max_steps}", flush=True)
    return module.eval(), ckpt


def trained_steps(ckpt: Path) -> int | None:
    """The checkpoint's global step (None for a sharded folder)."""
    if ckpt.is_dir():
        return None
    return int(torch.load(ckpt, map_location="cpu", weights_only=True).get("global_step", -1))


def held_out_pairs(job: Path, experiment: str, count: int | None = None) -> tuple[Any, dict[str, Any]]:
    """(the experiment's datamodule, one batch of every held-out edit pair in the editor layout). `count` pairs
    instead of the world's: every sample is drawn from (seed, kind, split, index), so the training pairs stay the
    same and the world's own held-out pairs come first."""
    cfg = compose_config([f"experiment={experiment}"], job / "data")
    if count:
        train, batch = int(cfg.data.world.edits[0]), int(cfg.data.val_batch_size or cfg.data.batch_size)
        cfg = compose_config([f"experiment={experiment}", f"data.world.edits=[{train},{count}]",
                              f"data.val_batches={-(-count // batch)}"], job / "data")
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="object")
    datamodule.prepare_data()
    datamodule.setup("validate")
    parts = [video_edit_batch(b) for b in datamodule.val_dataloader()]
    batch = {k: torch.cat([p[k] for p in parts]) if isinstance(parts[0][k], torch.Tensor)
             else [x for p in parts for x in p[k]] for k in parts[0]}
    return datamodule, batch


def chunks(batch: dict[str, Any], size: int) -> list[tuple[int, dict[str, Any]]]:
    n = len(batch["text"])
    return [(i, {k: v[i: i + size] for k, v in batch.items()}) for i in range(0, n, size)]


@torch.no_grad()
def edit_all(module: torch.nn.Module, batch: dict[str, Any], steps: int, seed: int = 0) -> torch.Tensor:
    """Every pair edited, sample i from noise seed + i (the same noise for every model)."""
    out = []
    for start, part in chunks(batch, 16):
        request = {"source": part["source"], "text": part["text"], "fps": part["fps"], "task": part["task"]}
        out.append(module.generate(request, *part["source"].shape[2:], steps=steps, seed=seed + start))
    return torch.cat(out)


@torch.no_grad()
def edit_first_frames(module: torch.nn.Module, batch: dict[str, Any], steps: int, seed: int = 0) -> torch.Tensor:
    """Every pair's first frame edited as a one-frame video (stage I's task: fps 0), held still for the clip's
    length [B, 3, T, H, W]: what the probe reads from one edited frame, without the motion."""
    out = []
    for start, part in chunks(batch, 16):
        request = {"source": part["source"][:, :, :1], "text": part["text"], "fps": torch.zeros(len(part["text"])),
                   "task": part["task"]}
        out.append(module.generate(request, 1, *part["source"].shape[3:], steps=steps, seed=seed + start))
    return still(torch.cat(out), batch["source"].shape[2])


def still(video: torch.Tensor, frames: int) -> torch.Tensor:
    """A clip's first frame repeated `frames` times."""
    return video[:, :, :1].expand(-1, -1, frames, -1, -1)


def first_frame_row(evaluator: EditEvaluator, video: torch.Tensor, batch: dict[str, Any]) -> dict[str, float | None]:
    """The edit success (overall and per kind, ± standard error) of stilled clips: `row` without the preservation
    and temporal metrics, which a clip held still does not have."""
    return {k: v for k, v in row(score(evaluator, video, batch)).items() if "success" in k}


SDEDIT_PROMPTS = ("instruction", "target caption")


@torch.no_grad()
def sdedit_all(module: torch.nn.Module, batch: dict[str, Any], steps: int, strength: float, seed: int = 0,
               prompt: str = "instruction") -> torch.Tensor:
    """SDEdit of every pair with the instruction as the prompt (the issue's baseline), or with the target clip's
    caption: the kind of text the text-to-video model was trained on."""
    def texts(part: dict[str, Any]) -> list[str]:
        return part["text"] if prompt == "instruction" else [m["edit"]["target_caption"] for m in part["meta"]]

    return torch.cat([sdedit(module, part["source"], texts(part), part["fps"], strength, steps, seed + start)
                      for start, part in chunks(batch, 16)])


def score(evaluator: EditEvaluator, video: torch.Tensor, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every metric per pair (per kind for the edit success), in the batch's order."""
    evaluator.values = {}
    evaluator.update(video, batch, {})
    return {name: torch.cat(parts) for name, parts in evaluator.values.items()}


def standard_error(values: torch.Tensor) -> float:
    """s / √n of per-pair values (0 for fewer than two)."""
    return float(values.std() / len(values) ** 0.5) if len(values) > 1 else 0.0


def row(values: dict[str, torch.Tensor], suffix: str = "", floor: dict[str, torch.Tensor] | None = None
        ) -> dict[str, float | None]:
    """Means with their standard errors ("_se") of the clips named by `suffix` ("": the model's, "_target",
    "_source"); with `floor` (the unedited source's values), also the success's paired gain over it,
    mean(g_i − x_i) ± its standard error ("gain_*"): the same pairs, so their own difficulty cancels."""
    columns = [("edit_success", "edit_success", ""), *((f"success_{k}", "edit_success", f"_{k}") for k in ASKED),
               ("preservation", "preservation", ""), ("temporal_error", "temporal_error", "")]
    out: dict[str, float | None] = {}
    for name, metric, kind in columns:
        own = values.get(f"{metric}{suffix}{kind}")
        out[name] = None if own is None else float(own.mean())
        out[f"{name}_se"] = None if own is None else standard_error(own)
        if floor is not None and own is not None and metric == "edit_success":
            gain = own - floor[f"{metric}_source{kind}"]
            out[f"gain_{name}"], out[f"gain_{name}_se"] = float(gain.mean()), standard_error(gain)
    return out


def grid(batch: dict[str, Any], samples: dict[str, torch.Tensor], count: int, scale: int = 4) -> Image.Image:
    """Per pair (the first `count`, one of each kind first): instruction, then source, target and each model's
    edit, frames left to right."""
    kinds: dict[str, int] = {}
    for i, meta in enumerate(batch["meta"]):
        kinds.setdefault(meta["edit"]["kind"], i)
    chosen = list(kinds.values()) + [i for i in range(len(batch["text"])) if i not in kinds.values()]
    rows = []
    for i in chosen[:count]:
        rows.append(caption_row(batch["text"][i][:100], 560))
        for name, clip in [("source", batch["source"][i]), ("target (real)", batch["video"][i]),
                           *((n, s[i]) for n, s in samples.items())]:
            rows.append(tagged_row(name, frames_row(clip, scale)))
        rows.append(np.full((6, rows[-1].shape[1], 3), 255, np.uint8))
    return stack_rows(rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.5, 0.75])
    parser.add_argument("--stages", nargs="+", default=["edit_stage1", "edit_stage2", "edit_stage3"],
                        help="editors; the first one's world gives the held-out pairs")
    parser.add_argument("--base", default="t2v_tiny",
                        help="the text-to-video experiment the stages start from (SDEdit's model and codec)")
    parser.add_argument("--held-out", type=int, default=None,
                        help="held-out pairs (default: the world's); more pairs, a smaller standard error")
    parser.add_argument("--single-frame", action="store_true",
                        help="also edit each pair's first frame as an image (stage I's task), scored held still")
    parser.add_argument("--grid-pairs", type=int, default=4)
    parser.add_argument("--name", default="edit", help="results file stem: <name>.json, <name>_grid.png")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    job = Path("/tmp") / "edit_benchmark"
    datamodule, batch = held_out_pairs(job, args.stages[0], args.held_out)
    evaluator = EditEvaluator()  # the probe of the experiments' test loop (same config: the same cached probe)
    evaluator.probe = probe_from_datamodule(datamodule, evaluator.config, str(ROOT / "data" / "probes"))
    base = score(evaluator, batch["source"], batch)
    table: dict[str, dict[str, Any]] = {"target (real, ceiling)": row(base, "_target", base),
                                        "source unchanged (floor)": row(base, "_source")}
    floors = {"preservation_other_clip": float(base["preservation_shuffled"].mean()),
              "temporal_error_shuffled_frames": float(base["temporal_error_shuffled"].mean())}
    samples: dict[str, torch.Tensor] = {}
    first_frame: dict[str, dict[str, float | None]] = {}
    if args.single_frame:
        frames = batch["source"].shape[2]
        first_frame["target (real, ceiling)"] = first_frame_row(evaluator, still(batch["video"], frames), batch)
        first_frame["source unchanged (floor)"] = first_frame_row(evaluator, still(batch["source"], frames), batch)
    t2v, t2v_ckpt = load(args.base, job)
    checkpoints = {args.base: str(t2v_ckpt.relative_to(ROOT)) if t2v_ckpt.is_relative_to(ROOT) else str(t2v_ckpt)}
    with torch.no_grad():
        through_codec = t2v.from_latent(t2v.encode(batch["source"]), batch["source"].shape[2])
    table["source via the codec (floor)"] = row(score(evaluator, through_codec, batch), floor=base)
    for prompt in SDEDIT_PROMPTS:
        for strength in args.strengths:
            name = f"SDEdit t2v, strength {strength:g}" + (", target caption" if prompt != "instruction" else "")
            start = time.perf_counter()
            samples[name] = sdedit_all(t2v, batch, args.steps, strength, prompt=prompt)
            table[name] = row(score(evaluator, samples[name], batch), floor=base) | {"seconds": time.perf_counter() - start}
            print(name, table[name], flush=True)
    for stage in args.stages:
        try:
            module, ckpt = load(stage, job)
        except FileNotFoundError as exc:
            print(f"[edit] {stage}: no checkpoint ({exc}); skipped")
            continue
        checkpoints[stage] = str(ckpt.relative_to(ROOT)) if ckpt.is_relative_to(ROOT) else str(ckpt)
        start = time.perf_counter()
        samples[stage] = edit_all(module, batch, args.steps)
        table[stage] = row(score(evaluator, samples[stage], batch), floor=base) | {"seconds": time.perf_counter() - start}
        print(stage, table[stage], flush=True)
        if args.single_frame:
            first_frame[stage] = first_frame_row(evaluator, edit_first_frames(module, batch, args.steps), batch)
            print(stage, "first frame:", first_frame[stage], flush=True)
    kinds = {k: sum(m["edit"]["kind"] == k for m in batch["meta"]) for k in ASKED}
    result = {"pairs": len(batch["text"]), "kinds": kinds, "steps": args.steps, "table": table, "floors": floors,
              "first_frame": first_frame or None,
              "checkpoints": checkpoints, "training_steps": STEPS, "outputs": str(OUTPUTS)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    grid(batch, {n: s for n, s in samples.items() if "0.75" not in n}, args.grid_pairs).save(
        RESULTS / f"{args.name}_grid.png")
    header = f"{'':48s} {'success':>8s} " + " ".join(f"{k:>9s}" for k in ASKED) + f" {'preserve':>9s} {'temporal':>9s}"
    print(header)
    for name, r in table.items():
        values = " ".join(f"{r[f'success_{k}']:9.3f}" if r[f"success_{k}"] is not None else f"{'-':>9s}" for k in ASKED)
        print(f"{name:48s} {r['edit_success']:8.3f} {values} {r['preservation']:9.4f} {r['temporal_error']:9.4f}")
    print("floors:", floors)
    print("paired gain in success over the unedited source, ± standard error:")
    for name, r in table.items():
        if "gain_edit_success" in r:
            gains = [f"{k} {r[f'gain_success_{k}']:+.3f}±{r[f'gain_success_{k}_se']:.3f}" for k in ASKED
                     if r.get(f"gain_success_{k}") is not None]
            print(f"{name:48s} {r['gain_edit_success']:+.3f}±{r['gain_edit_success_se']:.3f}  " + "  ".join(gains))
    return result


if __name__ == "__main__":
    main()
