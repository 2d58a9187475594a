"""Peak memory of TAE decoding, tiled vs untiled, for clips of 32, 64 and 128 frames (CPU, RSS).

    python experiments/benchmarks/tae_tiling.py [--frames 32 64 128] [--size 64] [--base-channels 32]

The model has the paper's structure (8x compression in T, H, W; 16 latent channels; channel multipliers
1, 2, 4, 4; two ResBlocks per level) at a reduced width, with random weights (memory does not depend on them).
Each measurement runs in a fresh subprocess (`--repeats` times; the median is reported, allocator noise is
some tens of MiB): after building the model and the latent it reads the resident set
size (psutil), decodes once under `torch.no_grad()` (`TAE.decode`, or `TAE.decode_tiled` with the paper's
tiles of 4 latent frames overlapping by 2), and reports the process's peak RSS (`ru_maxrss`) minus that
baseline. The decoded video itself (3·T·H·W float32) has to grow with T; "activations" is the peak minus it.
Prints a table and writes experiments/benchmarks/results/tae_tiling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "experiments" / "benchmarks" / "results" / "tae_tiling.json"


def model_config(base_channels: int) -> dict:
    return dict(latent_channels=16, base_channels=base_channels, channel_mults=[1, 2, 4, 4],
                temporal_down=[True, True, True], num_res_blocks=2, norm_groups=32)


def measure(frames: int, size: int, base_channels: int, tiled: bool, tile: int, overlap: int) -> dict:
    """One decode in this process; returns peak RSS above the pre-decode baseline (MiB) and the time."""
    import psutil
    import torch

    from lightning_modules.nn.tae import TAE

    torch.manual_seed(0)
    model = TAE(**model_config(base_channels)).eval()
    latent_shape = model.latent_shape((1, 3, frames, size, size))
    z = torch.randn(latent_shape)
    baseline = psutil.Process().memory_info().rss
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    with torch.no_grad():
        video = model.decode_tiled(z, frames, tile, overlap) if tiled else model.decode(z, frames)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    output = video.numel() * video.element_size()
    mib = 2**20
    return {
        "frames": frames, "tiled": tiled, "latent_shape": list(latent_shape), "seconds": round(seconds, 2),
        "peak_mib": round((peak - baseline) / mib, 1), "output_mib": round(output / mib, 1),
        "activations_mib": round((peak - baseline - output) / mib, 1),
        "baseline_mib": round(baseline / mib, 1), "peak_before_decode_mib": round(peak_before / mib, 1),
    }  # fmt: skip


def run_child(args: argparse.Namespace, frames: int, tiled: bool) -> dict:
    command = [sys.executable, __file__, "--child", "--frames", str(frames), "--size", str(args.size),
               "--base-channels", str(args.base_channels), "--tile", str(args.tile), "--overlap", str(args.overlap)]
    if tiled:
        command.append("--tiled")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--size", type=int, default=64, help="frame height and width (pixels)")
    parser.add_argument("--base-channels", type=int, default=32)
    parser.add_argument("--tile", type=int, default=4, help="latent frames per decoder tile")
    parser.add_argument("--overlap", type=int, default=2, help="latent frames shared by neighbouring tiles")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per setting; the median is reported")
    parser.add_argument("--tiled", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.frames[0], args.size, args.base_channels, args.tiled, args.tile, args.overlap)))
        return

    rows = []
    for frames in args.frames:
        for tiled in (False, True):
            runs = sorted((run_child(args, frames, tiled) for _ in range(args.repeats)), key=lambda r: r["peak_mib"])
            row = dict(runs[len(runs) // 2])  # the median run
            row["peak_mib_runs"] = [r["peak_mib"] for r in runs]
            rows.append(row)
    print(f"TAE decode peak memory (CPU RSS above baseline, median of {args.repeats}), {args.size}x{args.size} px, base "
          f"{args.base_channels} channels, tiles of {args.tile} latent frames overlapping by {args.overlap}")
    print(f"{'frames':>6} {'mode':>8} {'peak MiB':>9} {'output MiB':>10} {'activ. MiB':>10} {'seconds':>8}")
    for r in rows:
        mode = "tiled" if r["tiled"] else "untiled"
        print(f"{r['frames']:>6} {mode:>8} {r['peak_mib']:>9.1f} {r['output_mib']:>10.1f} {r['activations_mib']:>10.1f} {r['seconds']:>8.2f}")
    result = {
        "benchmark": "tae_tiling", "device": "cpu", "threads": args.threads, "size": args.size,
        "model": model_config(args.base_channels), "tile": args.tile, "overlap": args.overlap, "repeats": args.repeats,
        "python": platform.python_version(), "rows": rows,
    }  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
