"""Data-loading benchmark: decoded clips per second, 16 frames at 128x128, DataModule vs a plain PyAV loop.

    python experiments/benchmarks/data.py [--clips 256] [--repeats 3] [--batch-size 8]

Contenders, measured in the same run on the same h264 mp4 files (shapes-world scenes, 16 frames at 16 fps,
128x128), each producing float32 [3, 16, 128, 128] clips in [-1, 1]:
  plain       a loop that opens each mp4 file with PyAV, decodes its 16 frames to RGB and makes the tensor
              (plain-1t: the same with one decoding thread, as the datamodule's workers decode);
  dm-1, dm-2  `VideoDataModule` over the same clips written as shards (make_shards' folder mode), 1 and 2
              decoding workers: tar streaming, shuffle, bucketing, decode, resize/crop, batching included.
Each contender runs once to warm the page cache, then `repeats` times interleaved; the table reports the
median clips/s and the CPU time per clip (main process + workers). Targets: dm-1 >= 0.9x plain, dm-2 >= 1.7x plain (the latter needs 2 free cores). Results
go to experiments/benchmarks/results/data.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import av  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from einops import rearrange  # noqa: E402

from datamodules.media import encode_frames  # noqa: E402
from datamodules.synthetic import WorldConfig  # noqa: E402
from datamodules.synthetic.generate import make_scene  # noqa: E402
from datamodules.video import VideoDataModule  # noqa: E402
from datamodules.write_shards import folder_to_shards  # noqa: E402

FRAMES, SIZE, FPS = 16, 128, 16.0
RESULTS = ROOT / "experiments" / "benchmarks" / "results" / "data.json"


def make_clips(folder: Path, clips: int, unique: int = 64) -> list[Path]:
    """`clips` mp4 files (cycling over `unique` rendered scenes) with a caption beside each."""
    config = WorldConfig(sizes=[[SIZE, SIZE]], fps=[FPS], durations=[FRAMES / FPS])
    encoded = []
    for i in range(min(unique, clips)):
        rendered, _ = make_scene(config, "train", i)
        encoded.append((encode_frames(rendered.frames, FPS), f"clip {i}"))
    paths = []
    for i in range(clips):
        data, caption = encoded[i % len(encoded)]
        path = folder / f"clip{i:05d}.mp4"
        path.write_bytes(data)
        path.with_suffix(".txt").write_text(caption)
        paths.append(path)
    return paths


def plain_loop(paths: list[Path], single_thread: bool = False) -> float:
    """Clips per second of: open with PyAV, decode 16 frames, stack, to float [3, T, H, W] in [-1, 1].

    PyAV's default decoder threading, or one decoding thread (as the datamodule's workers use)."""
    start = time.perf_counter()
    for path in paths:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            if single_thread:
                stream.thread_type = "NONE"
            frames = [f.to_ndarray(format="rgb24") for _, f in zip(range(FRAMES), container.decode(stream))]
        clip = torch.from_numpy(np.stack(frames)).float().div_(127.5).sub_(1.0)
        clip = rearrange(clip, "t h w c -> c t h w").contiguous()
        assert clip.shape == (3, FRAMES, SIZE, SIZE)
    return len(paths) / (time.perf_counter() - start)


def datamodule_loop(shards: Path, clips: int, workers: int, batch_size: int) -> float:
    """Clips per second of one epoch of VideoDataModule (worker start-up included)."""
    dm = VideoDataModule(shards=str(shards), sizes=[[SIZE, SIZE]], frames=[FRAMES], fps=FPS, batch_size=batch_size,
                         num_workers=workers, epoch_batches=clips // batch_size, shuffle_buffer=64, seed=0)
    dm.setup("fit")
    loader = dm.train_dataloader()
    start = time.perf_counter()
    count = 0
    for batch in loader:
        assert batch["video"].shape[1:] == (3, FRAMES, SIZE, SIZE)
        count += batch["video"].shape[0]
    return count / (time.perf_counter() - start)


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its finished children (the loader's workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder, shards = Path(tmp) / "clips", Path(tmp) / "shards"
        folder.mkdir()
        paths = make_clips(folder, args.clips)
        folder_to_shards(folder, shards, maxcount=32, progress=False)
        runs = {
            "plain": lambda: plain_loop(paths),
            "plain-1t": lambda: plain_loop(paths, single_thread=True),
            "dm-1": lambda: datamodule_loop(shards, args.clips, 1, args.batch_size),
            "dm-2": lambda: datamodule_loop(shards, args.clips, 2, args.batch_size),
        }
        for run in runs.values():  # warm-up: page cache, imports, first fork
            run()
        samples: dict[str, list[float]] = {name: [] for name in runs}
        cpu: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                before = cpu_seconds()
                samples[name].append(run())
                cpu[name].append(1000 * (cpu_seconds() - before) / args.clips)
    rate = {name: statistics.median(values) for name, values in samples.items()}
    cpu_ms = {name: statistics.median(values) for name, values in cpu.items()}
    targets = {"dm-1": 0.9, "dm-2": 1.7}
    result = {
        "clips": args.clips, "frames": FRAMES, "size": SIZE, "batch_size": args.batch_size, "repeats": args.repeats,
        "clips_per_second": rate, "cpu_ms_per_clip": cpu_ms, "runs": samples,
        "speedup": {name: rate[name] / rate["plain"] for name in runs}, "targets": targets,
        "machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg(), "python": platform.python_version(),
                    "torch": torch.__version__, "av": av.__version__},
    }
    print(f"{'loader':<9} {'clips/s':>8} {'vs plain':>9} {'target':>7} {'cpu ms/clip':>12}")
    for name in runs:
        target = f"{targets[name]:.1f}x" if name in targets else ""
        print(f"{name:<9} {rate[name]:8.1f} {rate[name] / rate['plain']:8.2f}x {target:>7} {cpu_ms[name]:12.2f}")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus (other processes share them)")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
