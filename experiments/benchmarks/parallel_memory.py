"""Memory per rank of a DiT split over 2 gloo processes, measured, beside what `experiments/plan.py` plans for it.

    python experiments/benchmarks/parallel_memory.py [--steps 3]

For each split of 2 CPU processes (FSDP over 2 data-parallel ranks; tensor parallel 2; context parallel 2) and
one process as the baseline, a DiT (4 blocks, width 256, SwiGLU 1024, 1024 video tokens, 2 clips per rank, fp32)
trains a few AdamW steps without activation checkpointing. Measured: each rank's peak resident memory during
those steps, in bytes that malloc holds for the process (glibc's mallinfo2: every live tensor, not the pages
the allocator keeps after a free, which resident memory would count), sampled after every block's forward and
backward and around the optimizer step, above what it held before the model was built (a first build on a tiny
model loads the code and DTensor's caches beforehand). Planned: `plan.memory_and_communication` for the same sizes (fp32, no
checkpointing): sharded states (weights, gradients, Adam) + activations kept for the backward. Prints a table
and writes experiments/benchmarks/results/parallel_memory.json.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from experiments.plan import memory_and_communication, parameter_breakdown, tensor_parallel_split  # noqa: E402
from lightning_modules.model_parallel import ModelParallel, apply_model_parallel, sync_gradients  # noqa: E402
from lightning_modules.nn.dit import DiT  # noqa: E402
from lightning_modules.parallel import ParallelConfig, apply_parallelism  # noqa: E402

RESULTS = ROOT / "experiments" / "benchmarks" / "results" / "parallel_memory.json"
DIT = dict(in_channels=16, dim=256, depth=4, heads=8, ffn_dim=1024, patch=(1, 2, 2), max_t=4, max_h=16, max_w=16)
FRAMES, SIZE, MICRO, TEXT = 4, 32, 2, 8           # latent 16 x 4 x 32 x 32 -> 4 x 16 x 16 = 1024 tokens
SPLITS = {"one process": (1, 1, 1), "FSDP dp=2": (2, 1, 1), "TP tp=2": (2, 2, 1), "CP cp=2": (2, 1, 2)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


_LIBC = ctypes.CDLL("libc.so.6")
_LIBC.mallinfo2.restype = _Mallinfo2


class Peak:
    """The largest number of bytes malloc held (small blocks in use + mmapped large ones) at the sampled points."""

    def __init__(self) -> None:
        self.value = 0

    def sample(self, *_: object) -> None:
        info = _LIBC.mallinfo2()
        self.value = max(self.value, info.uordblks + info.hblkhd)


def in_use() -> int:
    info = _LIBC.mallinfo2()
    return info.uordblks + info.hblkhd


def _train(config: dict, parallel: ModelParallel | None, steps: int, peak: Peak | None = None) -> None:
    torch.manual_seed(0)
    net = DiT(**config)
    if peak is not None:
        for block in net.blocks:
            block.register_forward_hook(peak.sample)
            block.register_full_backward_hook(peak.sample)
    if parallel is not None:
        apply_model_parallel(net, parallel)
        if parallel.dp_mesh.size() > 1:
            apply_parallelism(net, list(net.blocks), parallel.dp_mesh, ParallelConfig())
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(MICRO, config["in_channels"], FRAMES, SIZE, SIZE, generator=g)
        context = torch.randn(MICRO, TEXT, config["dim"], generator=g)
        loss = net(x, torch.rand(MICRO, generator=g), context).pow(2).mean()
        loss.backward()
        sync_gradients(parallel)
        optimizer.step()
        if peak is not None:
            peak.sample()
        optimizer.zero_grad(set_to_none=True)


def _worker(rank: int, world: int, port: int, tp: int, cp: int, steps: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    parallel = None
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        parallel = ModelParallel.build("cpu", world, tp=tp, cp=cp)
    _train(dict(DIT, dim=32, ffn_dim=64, depth=1, heads=8, max_h=16, max_w=16), parallel, 1)  # load code and caches
    base, peak = in_use(), Peak()
    _train(DIT, parallel, steps, peak)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"peak_bytes": peak.value - base}))
    if world > 1:
        dist.destroy_process_group()


def planned(world: int, tp: int, cp: int) -> dict:
    with torch.device("meta"):
        net = DiT(**DIT)
    tokens = FRAMES * (SIZE // 2) ** 2
    return memory_and_communication(parameter_breakdown(net), tensor_parallel_split(net), 0, tokens, DIT["dim"],
                                    DIT["ffn_dim"], DIT["depth"], MICRO, world, tp, cp, dtype="fp32",
                                    checkpointing=False)


def measure(world: int, tp: int, cp: int, steps: int = 3) -> int:
    """The largest peak of the ranks of one run (bytes above the rank's memory before the model)."""
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(world, free_port(), tp, cp, steps, out), nprocs=world, join=True)
        return max(json.loads(p.read_text())["peak_bytes"] for p in Path(out).glob("rank*.json"))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    rows = {}
    for name, (world, tp, cp) in SPLITS.items():
        measured = measure(world, tp, cp, args.steps)
        plan = planned(world, tp, cp)
        rows[name] = {"world": world, "tp": tp, "cp": cp, "measured_mib": measured / 2**20,
                      "planned_mib": plan["total"] / 2**20, "planned_states_mib": plan["states"] / 2**20,
                      "planned_activations_mib": plan["activations"] / 2**20,
                      "ratio": plan["total"] / measured}
    print(f"{'split':<14}{'measured MiB':>14}{'planned MiB':>13}{'(states':>9}{'+ acts)':>9}{'planned/measured':>18}")
    for name, r in rows.items():
        print(f"{name:<14}{r['measured_mib']:>14.1f}{r['planned_mib']:>13.1f}{r['planned_states_mib']:>9.1f}"
              f"{r['planned_activations_mib']:>9.1f}{r['ratio']:>18.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"config": {**DIT, "frames": FRAMES, "size": SIZE, "micro_batch": MICRO},
                                   "steps": args.steps, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
