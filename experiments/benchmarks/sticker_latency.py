"""Latency of one sticker clip: the distilled student against its teacher, in the same run.

    python experiments/benchmarks/sticker_latency.py [--repeats 7] [--threads 1] [--device cpu] [key=value ...]
    python experiments/benchmarks/sticker_latency.py --smoke          # 1 warm-up, 2 repeats: a wiring check

The models: the student of `experiment=sticker_student` (conf/model/sticker_student.yaml; further key=value are
Hydra overrides of it) and the teacher of the ensemble, `experiment=sticker_stage2`'s model (the sticker_tiny
architecture; the student distils its own start, not this model, but replaces it at sampling), with their random
initial weights: time does not depend on the values of the weights. One request = one 8-frame 16x16 clip
from a prompt and a sticker image, end to end through `GenerationModule.generate` (text encoding, the sticker's
latent, the solver, decoding). Timed, each as the median wall time of --repeats runs after --warmup runs:

    teacher        50 Euler steps x 3 guidance passes (p0, image, image + text: one call on the batch of 3)
    teacher_1pass  the teacher's architecture, 8 steps x 1 pass (all scales 1): its share of the speed-up
    teacher_8x3    the teacher, 8 steps x 3 passes: the steps' share alone
    student        8 steps x 1 pass, the guidance scales as an input (the distilled student)

Speed-ups teacher / x are reported; the target is student >= 15x. The split: teacher / teacher_1pass is the
steps and passes; teacher_1pass / student the smaller architecture. The CPUs may be shared with other work: the
numbers are those of the moment (the load average is printed). Written to
experiments/benchmarks/results/sticker_latency.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

import hydra  # noqa: E402
import torch  # noqa: E402

from experiments.compose import compose_config  # noqa: E402

TARGET = 15.0  # the student should be at least this much faster than the teacher


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], warmup: int, repeats: int, device: torch.device) -> list[float]:
    """Wall times of `repeats` calls of fn after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (fixed for every model)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--teacher-steps", type=int, default=50)
    parser.add_argument("--smoke", action="store_true", help="1 warm-up, 2 repeats (a wiring check)")
    parser.add_argument("--output", default=str(ROOT / "experiments/benchmarks/results/sticker_latency.json"))
    args, overrides = parser.parse_known_args(argv)
    if args.smoke:
        args.warmup, args.repeats = 1, 2
    torch.set_num_threads(args.threads)
    if not any(o.startswith("experiment=") for o in overrides):
        overrides.insert(0, "experiment=sticker_student")
    overrides += ["model.evaluators=null", "model.scheduler=null"]
    output_dir = Path(os.environ.get("OUTPUT_DIR", ROOT / "outputs")) / "benchmark"
    cfg = compose_config(overrides, output_dir)
    torch.manual_seed(0)
    device = torch.device(args.device)
    student = hydra.utils.instantiate(cfg.model, _convert_="object").to(device).eval()
    teacher_cfg = compose_config(["experiment=sticker_stage2", "model.evaluators=null", "model.scheduler=null",
                                  "model.init_from=null"], output_dir)
    teacher = hydra.utils.instantiate(teacher_cfg.model, _convert_="object").to(device).eval()
    frames, (height, width) = int(cfg.data.frames[0]), cfg.data.sizes[0]
    request = {"text": ["a red star with polka dots spins, on a plain white background"],
               "image": torch.rand(1, 3, height, width, device=device) * 2 - 1,  # the sticker
               "fps": torch.tensor([float(cfg.data.fps)])}
    guided, steps = dict(teacher.sampler.guidance), student.sampler.steps
    runs = {
        "teacher": (teacher, dict(steps=args.teacher_steps), f"{args.teacher_steps} steps x 3 passes"),
        "teacher_1pass": (teacher, dict(steps=steps, guidance_scales={n: 1.0 for n in guided}),
                          f"{steps} steps x 1 pass (teacher architecture)"),
        "teacher_8x3": (teacher, dict(steps=steps), f"{steps} steps x 3 passes"),
        "student": (student, dict(steps=steps), f"{steps} steps x 1 pass (guidance as an input)"),
    }
    results = {}
    with torch.inference_mode():
        for name, (model, options, what) in runs.items():
            times = median_seconds(lambda m=model, o=options: m.generate(request, frames, height, width, **o),
                                   args.warmup, args.repeats, device)
            results[name] = {"what": what, "median_s": statistics.median(times), "times_s": times,
                             "parameters": sum(p.numel() for p in model.net.parameters())}
    teacher_s = results["teacher"]["median_s"]
    speedups = {name: teacher_s / r["median_s"] for name, r in results.items() if name != "teacher"}
    split = {"steps_and_passes": teacher_s / results["teacher_1pass"]["median_s"],
             "architecture": results["teacher_1pass"]["median_s"] / results["student"]["median_s"]}
    report = {
        "experiment": cfg.experiment_name, "overrides": overrides, "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(), "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else "cpu", "clip": [frames, height, width], "warmup": args.warmup, "repeats": args.repeats,
        "results": results, "speedup_vs_teacher": speedups, "speedup_split": split,
        "target_speedup": TARGET, "target_met": speedups["student"] >= TARGET,
    }
    print(f"one {frames}x{height}x{width} clip on {report['device']}, {report['threads']} thread(s), load "
          f"{report['load_average'][0]:.1f}; median of {args.repeats} after {args.warmup} warm-up")
    print(f"{'model':<15}{'what':<46}{'params':>10}{'median ms':>11}{'speed-up':>10}")
    for name, r in results.items():
        ratio = "1.0x" if name == "teacher" else f"{speedups[name]:.1f}x"
        print(f"{name:<15}{r['what']:<46}{r['parameters']:>10,}{1e3 * r['median_s']:>11.1f}{ratio:>10}")
    print(f"split: steps and passes {split['steps_and_passes']:.1f}x, smaller architecture {split['architecture']:.1f}x; "
          f"target student >= {TARGET:g}x: {'met' if report['target_met'] else 'NOT met'}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
