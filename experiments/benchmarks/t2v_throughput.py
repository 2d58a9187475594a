"""Training throughput of the text-to-video model on this machine, against its measured matmul FLOP/s.

    OMP_NUM_THREADS=1 python experiments/benchmarks/t2v_throughput.py [--steps 20] [--threads 1] [key=value ...]
    python experiments/benchmarks/t2v_throughput.py --device cuda --precision bf16      # a bf16 step on a GPU

The model is the experiment's (default `experiment=t2v_tiny`; further `key=value` are Hydra overrides).
One step = text encoding + DiT forward + backward + AdamW on a batch of random clips of the data config's first
bucket, with the quickstart's captions. Reported:

- tokens/s: video tokens (DiT patches) trained per second, and clips/s;
- FLOP/s: FLOPs of a step counted by torch's FlopCounterMode (matmuls, convolutions and attention of the
  forward and backward, text encoder included), divided by the step time;
- the fraction of the machine's measured matmul FLOP/s: the best of several [n, n] @ [n, n] products
  (2n³ FLOPs each) in the step's precision, with the same thread count on the CPU.

`--precision bf16` runs the step under `torch.autocast(dtype=torch.bfloat16)` with fp32 weights and optimizer
state, which is what Lightning's `trainer.precision=bf16-mixed` (conf/trainer/gpu.yaml) does.

The CPUs may be shared with other work: the numbers are those of the moment (the load average is printed).
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
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from experiments.compose import compose_config  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops(n: int = 1024, repeats: int = 10, device: torch.device = torch.device("cpu"),
                 dtype: torch.dtype = torch.float32) -> float:
    """Best FLOP/s of [n, n] @ [n, n] (2n³ FLOPs) over `repeats` runs."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: as set)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--output", default=str(ROOT / "experiments/benchmarks/results/t2v_throughput.json"))
    args, overrides = parser.parse_known_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not any(o.startswith("experiment=") for o in overrides):
        overrides.insert(0, "experiment=t2v_tiny")
    cfg = compose_config(overrides, Path(os.environ.get("OUTPUT_DIR", ROOT / "outputs")) / "benchmark")
    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    module = hydra.utils.instantiate(cfg.model, _convert_="object").to(device)
    optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=1e-4)
    (height, width), frames = cfg.data.sizes[0], cfg.data.frames[0]
    batch_size = int(cfg.data.batch_size)
    batch = {"video": torch.rand(batch_size, 3, frames, height, width, device=device) * 2 - 1,
             "text": ["A small red striped circle bounces around, on a plain white background."] * batch_size,
             "fps": torch.full((batch_size,), float(cfg.data.fps or 8.0))}
    if hasattr(module.codec, "fit") and not module.codec.fitted:
        module.codec.fit([batch["video"]])  # a codec fitted on data (PCA): its basis, not its quality, sets the cost
    tokens = batch_size * module.net.num_tokens(module.codec.latent_shape(frames, height, width))

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = module.loss(batch, train=True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    step_flops = counter.get_total_flops()
    for _ in range(args.warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    synchronize(device)
    seconds = (time.perf_counter() - start) / args.steps
    peak = matmul_flops(4096 if device.type == "cuda" else 1024, device=device, dtype=dtype)
    result = {
        "experiment": cfg.experiment_name, "overrides": overrides, "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(), "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else "cpu", "precision": args.precision, "last_loss": float(loss),
        "parameters": sum(p.numel() for p in module.parameters()), "batch": batch_size,
        "clip": [frames, height, width], "tokens_per_step": tokens, "step_seconds": seconds,
        "tokens_per_second": tokens / seconds, "clips_per_second": batch_size / seconds,
        "step_flops": step_flops, "achieved_flops_per_second": step_flops / seconds,
        "matmul_flops_per_second": peak, "fraction_of_matmul": step_flops / seconds / peak,
    }
    print(f"{result['parameters'] / 1e6:.2f}M parameters, batch {batch_size} x {frames}x{height}x{width} = {tokens} "
          f"tokens, {torch.get_num_threads()} thread(s), load {result['load_average'][0]:.1f}")
    print(f"step {seconds * 1e3:.1f} ms: {result['tokens_per_second']:,.0f} tokens/s, "
          f"{result['clips_per_second']:.1f} clips/s; {step_flops / 1e9:.2f} GFLOP/step -> "
          f"{result['achieved_flops_per_second'] / 1e9:.2f} GFLOP/s = {100 * result['fraction_of_matmul']:.1f}% of the "
          f"measured {args.precision} matmul {peak / 1e9:.1f} GFLOP/s on {result['device']}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
