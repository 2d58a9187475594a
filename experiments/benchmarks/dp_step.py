"""Step time of private training against non-private, same model and batch, in one process.

    python experiments/benchmarks/dp_step.py                      # the dp_digits_unbalanced model and batch
    python experiments/benchmarks/dp_step.py --width 32 --batch-size 256 --repeats 7

Modes (one optimizer step each = forward, backward, clip, noise, update):
  non_private          plain SGD
  opacus_dpsgd         Opacus's own PrivacyEngine (GradSampleModule hooks + DPOptimizer), the reference
  dpsgd                this framework's DP-SGD (GradSampleHooks on the unwrapped model + PrivateOptimizer)
  dpsgd_global_adapt   this framework's Global-Adapt (same hooks; clip C0 / max(||g||, Z), Z update from a noisy count)
  opacus_ghost         Opacus ghost clipping (norms without per-example gradients, two backward passes);
                       valid here because the benchmark owns the per-example loss (a LightningModule does not)

Timing: modes are interleaved, `repeats` rounds of `steps` steps each after warm-up; the median per mode is
reported, so load from other processes hits every mode alike. Prints a table and writes
experiments/benchmarks/results/dp_step.json. Target: Global-Adapt <= 1.15x DP-SGD.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from opacus import PrivacyEngine  # noqa: E402
from opacus.grad_sample import GradSampleHooks  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_modules.nn.cnn import SmallCNN  # noqa: E402
from lightning_modules.privacy.optimizers import DPSGDGlobalAdaptOptimizer, PrivateOptimizer  # noqa: E402

RESULTS = ROOT / "experiments" / "benchmarks" / "results" / "dp_step.json"
Step = Callable[[], None]


def make_steps(width: int, batch_size: int, sigma: float = 1.0, c0: float = 1.0) -> dict[str, Step]:
    """One closure per mode, each with its own copy of the same initial model, on the same batch."""
    torch.manual_seed(0)
    x, y = torch.randn(batch_size, 1, 8, 8), torch.randint(0, 10, (batch_size,))
    initial = SmallCNN(1, 10, width, "group").state_dict()

    def model() -> nn.Module:
        net = SmallCNN(1, 10, width, "group")
        net.load_state_dict(initial)
        return net

    steps: dict[str, Step] = {}

    net = model()
    sgd = torch.optim.SGD(net.parameters(), lr=0.01)

    def non_private() -> None:
        sgd.zero_grad()
        F.cross_entropy(net(x), y).backward()
        sgd.step()

    steps["non_private"] = non_private

    def engine(mode: str) -> Step:
        net = model()
        loader = DataLoader(TensorDataset(x, y), batch_size=batch_size)
        made = PrivacyEngine(accountant="rdp").make_private(
            module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.01), data_loader=loader, criterion=nn.CrossEntropyLoss(),
            noise_multiplier=sigma, max_grad_norm=c0, poisson_sampling=False, grad_sample_mode=mode)
        module, optimizer, criterion = made[0], made[1], made[2] if mode == "ghost" else nn.CrossEntropyLoss()

        def step() -> None:
            optimizer.zero_grad()
            criterion(module(x), y).backward()
            optimizer.step()

        return step

    steps["opacus_dpsgd"] = engine("hooks")

    def ours(cls: type[PrivateOptimizer], **kwargs) -> Step:
        net = model()
        GradSampleHooks(net, loss_reduction="mean")
        optimizer = cls(torch.optim.SGD(net.parameters(), lr=0.01), noise_multiplier=sigma, max_grad_norm=c0,
                        expected_batch_size=float(batch_size), **kwargs)

        def step() -> None:
            optimizer.zero_grad()
            F.cross_entropy(net(x), y).backward()
            optimizer.step()

        return step

    steps["dpsgd"] = ours(PrivateOptimizer)
    steps["dpsgd_global_adapt"] = ours(DPSGDGlobalAdaptOptimizer, z0=50.0, count_noise_multiplier=10.0)
    try:
        steps["opacus_ghost"] = engine("ghost")
        steps["opacus_ghost"]()
    except Exception as error:  # a layer ghost clipping cannot handle: report, do not fail the benchmark
        print(f"ghost clipping not valid for this model: {error}")
        steps.pop("opacus_ghost", None)
    return steps


def benchmark(steps: dict[str, Step], n_steps: int, repeats: int, warmup: int = 5) -> dict[str, float]:
    """Median over `repeats` interleaved rounds of the mean step time (ms) of each mode."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(n_steps):
                step()
            times[name].append((time.perf_counter() - start) / n_steps * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=8, help="SmallCNN width (the experiment uses 8)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    ms = benchmark(make_steps(args.width, args.batch_size), args.steps, args.repeats)
    base, dpsgd = ms["non_private"], ms["dpsgd"]
    params = sum(p.numel() for p in SmallCNN(1, 10, args.width, "group").parameters())
    print(f"SmallCNN width {args.width} ({params:,} params), batch {args.batch_size}, {args.threads} thread(s), "
          f"median of {args.repeats} x {args.steps} steps")
    print("| mode | ms/step | x non-private | x dpsgd |\n|---|---|---|---|")
    for name, value in ms.items():
        print(f"| {name} | {value:.2f} | {value / base:.2f} | {value / dpsgd:.2f} |")
    ratio = ms["dpsgd_global_adapt"] / dpsgd
    print(f"Global-Adapt / DP-SGD = {ratio:.3f} (target <= 1.15: {'met' if ratio <= 1.15 else 'NOT met'})")

    record = {
        "config": {"model": "SmallCNN", "width": args.width, "params": params, "batch_size": args.batch_size,
                   "steps": args.steps, "repeats": args.repeats, "threads": args.threads},
        "ms_per_step": ms,
        "ratio_to_non_private": {k: v / base for k, v in ms.items()},
        "global_adapt_over_dpsgd": ratio,
        "target_global_adapt_over_dpsgd": 1.15,
        "machine": {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_average_1min": os.getloadavg()[0]},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    runs = json.loads(args.out.read_text()) if args.out.exists() else {}
    runs[f"width{args.width}_batch{args.batch_size}"] = record
    args.out.write_text(json.dumps(runs, indent=1))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
