"""Linear-quadratic versus uniform Euler schedules, against a 1000-step reference from the same noise.

    OMP_NUM_THREADS=1 python experiments/benchmarks/t2v_schedules.py ckpt=<last.ckpt> [--prompts 16] [key=value ...]

For held-out captions of the experiment's validation set (default `experiment=t2v_tiny`; further key=value are
Hydra overrides) and one noise per prompt, the trained model (EMA weights when the checkpoint has them) is
sampled with Euler over
  - 1000 uniform steps (the reference, ≈ the ODE solution),
  - S linear-quadratic steps (emulating 1000; Movie Gen's choice),
  - S uniform steps,
and each S-step latent is compared with the reference: mean squared distance in the normalised latent space,
averaged over prompts (the guidance scale is the experiment's). S defaults to 50; --steps takes several.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

import hydra  # noqa: E402
import torch  # noqa: E402

from callbacks.ema import load_ema_weights  # noqa: E402
from experiments.compose import compose_config  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--steps", type=int, nargs="+", default=[50])
    parser.add_argument("--reference", type=int, default=1000)
    parser.add_argument("--output", default=str(ROOT / "experiments/benchmarks/results/t2v_schedules.json"))
    args, rest = parser.parse_known_args(argv)
    ckpt = next((a.split("=", 1)[1] for a in rest if a.startswith("ckpt=")), None)
    overrides = [a for a in rest if not a.startswith("ckpt=")]
    if ckpt is None:
        raise SystemExit("give ckpt=<a checkpoint of the experiment>")
    if not any(o.startswith("experiment=") for o in overrides):
        overrides.insert(0, "experiment=t2v_tiny")
    cfg = compose_config(overrides, Path(os.environ.get("OUTPUT_DIR", ROOT / "outputs")) / "benchmark")
    module = hydra.utils.instantiate(cfg.model, _convert_="object")
    module.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"])
    ema = load_ema_weights(module, ckpt)
    module.eval()
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="object")
    datamodule.prepare_data()
    datamodule.setup("validate")
    captions, fps, shape = [], [], None
    for batch in datamodule.val_dataloader():
        captions += list(batch["text"])
        fps += batch["fps"].tolist()
        shape = tuple(batch["video"].shape[2:])
        if len(captions) >= args.prompts:
            break
    captions, fps = captions[: args.prompts], fps[: args.prompts]
    frames, height, width = shape
    noise = module.noise(module.codec.latent_shape(frames, height, width), 1234, len(captions))

    def latent(steps: int, schedule: str) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        out = module.generate({"text": captions, "fps": torch.tensor(fps)}, frames, height, width, steps=steps,
                              schedule=schedule, noise=noise, return_latent=True)
        return out, time.perf_counter() - start

    reference, ref_seconds = latent(args.reference, "uniform")
    result = {"checkpoint": str(ckpt), "ema": ema, "prompts": len(captions), "guidance": module.sampler.guidance,
              "reference_steps": args.reference, "reference_seconds": ref_seconds, "runs": []}
    for steps in args.steps:
        for schedule in ("linear_quadratic", "uniform"):
            x, seconds = latent(steps, schedule)
            mse = (x - reference).pow(2).flatten(1).mean(1)
            result["runs"].append({"steps": steps, "schedule": schedule, "mse": float(mse.mean()),
                                   "mse_std": float(mse.std()), "seconds": seconds})
            print(f"{schedule:>16} {steps:>4} steps: MSE to the {args.reference}-step sample {mse.mean():.5f} "
                  f"(± {mse.std():.5f} over {len(captions)} prompts), {seconds:.1f} s")
    result["reference_latent_variance"] = float(reference.var())
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
