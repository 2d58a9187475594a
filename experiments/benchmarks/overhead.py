"""Framework overhead: a training step of the digits experiment through `experiments/run.py`'s runner versus
a hand-written PyTorch loop of the same model, data, optimizer and batch size, in the same process.

    python experiments/benchmarks/overhead.py [--epochs 6] [--repeats 3]

Both sides time whole training epochs after a warm-up epoch (the framework's with a callback from epoch start
to epoch end, validation off) and report the median time per step; the ratio framework / hand-written is the
overhead (target: at most 1.10). A third column runs the same LightningModule in a bare `Trainer` (no logger,
callbacks or progress bar): Lightning's own loop, the floor under what run.py adds. Prints a table and writes
experiments/benchmarks/results/overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import hydra  # noqa: E402
import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from omegaconf import open_dict  # noqa: E402

from experiments.compose import compose_config  # noqa: E402
from experiments.runner import run  # noqa: E402

RESULTS = ROOT / "experiments" / "benchmarks" / "results"


class EpochTimer(Callback):
    """Seconds per training step of each epoch, appended as JSON lines to `out_file`."""

    def __init__(self, out_file: str) -> None:
        self.out_file = Path(out_file)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start, self._step0 = time.perf_counter(), trainer.global_step

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        steps = trainer.global_step - self._step0
        with self.out_file.open("a") as f:
            f.write(json.dumps((time.perf_counter() - self._start) / steps) + "\n")


def framework_step_time(epochs: int, out: Path) -> float:
    cfg = compose_config(
        ["experiment=digits_classifier", f"trainer.max_epochs={epochs}", "trainer.limit_val_batches=0",
         "test_after_fit=false", "trainer.enable_progress_bar=true"],
        out,
    )
    out.mkdir(parents=True, exist_ok=True)
    times_file = out / "step_times.jsonl"
    with open_dict(cfg):
        cfg.callbacks.timer = {"_target_": "experiments.benchmarks.overhead.EpochTimer", "out_file": str(times_file)}
    run(cfg)
    seconds_per_step = [json.loads(line) for line in times_file.read_text().splitlines()]
    return statistics.median(seconds_per_step[1:])  # epoch 0 is the warm-up


def bare_lightning_step_time(epochs: int, out: Path) -> float:
    cfg = compose_config(["experiment=digits_classifier"], out)
    L.seed_everything(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    times_file = out / "step_times.jsonl"
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=epochs, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[EpochTimer(str(times_file))],
        default_root_dir=str(out),
    )
    trainer.fit(hydra.utils.instantiate(cfg.model, _convert_="object"), datamodule=hydra.utils.instantiate(cfg.data))
    seconds_per_step = [json.loads(line) for line in times_file.read_text().splitlines()]
    return statistics.median(seconds_per_step[1:])


def hand_written_step_time(epochs: int, out: Path) -> float:
    cfg = compose_config(["experiment=digits_classifier"], out)
    L.seed_everything(cfg.seed)
    data = hydra.utils.instantiate(cfg.data)
    data.setup()
    loader = data.train_dataloader()
    net = hydra.utils.instantiate(cfg.model.net)
    optimizer = hydra.utils.instantiate(cfg.model.optimizer)(net.parameters())
    scheduler = hydra.utils.instantiate(cfg.model.scheduler)(optimizer)
    per_step = []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        start, steps = time.perf_counter(), 0
        for batch in loader:
            loss = F.cross_entropy(net(batch["x"]), batch["y"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
        scheduler.step()
        per_step.append((time.perf_counter() - start) / steps)
    return statistics.median(per_step[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadier on shared CPUs)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["OUTPUT_DIR"] = tmp  # keep benchmark runs out of the project's MLflow store
        for repeat in range(args.repeats):  # interleaved, so both sides see the same machine load
            hand = hand_written_step_time(args.epochs, Path(tmp) / f"hand{repeat}")
            bare = bare_lightning_step_time(args.epochs, Path(tmp) / f"bare{repeat}")
            framework = framework_step_time(args.epochs, Path(tmp) / f"fw{repeat}")
            rows.append({"repeat": repeat, "hand_ms": hand * 1e3, "bare_lightning_ms": bare * 1e3,
                         "framework_ms": framework * 1e3, "bare_ratio": bare / hand, "ratio": framework / hand})
    ratio = statistics.median(r["ratio"] for r in rows)
    bare_ratio = statistics.median(r["bare_ratio"] for r in rows)
    print(f"\n{'repeat':>6} {'hand-written ms':>16} {'bare Lightning ms':>18} {'run.py ms':>10} {'bare ratio':>11} {'ratio':>7}")
    for r in rows:
        print(f"{r['repeat']:>6} {r['hand_ms']:>16.3f} {r['bare_lightning_ms']:>18.3f} {r['framework_ms']:>10.3f} "
              f"{r['bare_ratio']:>11.3f} {r['ratio']:>7.3f}")
    print(f"median ratio: {ratio:.3f} (target <= 1.10: {'met' if ratio <= 1.10 else 'NOT met'}); "
          f"bare Lightning alone: {bare_ratio:.3f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "overhead", "machine": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "epochs": args.epochs, "rows": rows, "median_ratio": ratio,
              "median_bare_lightning_ratio": bare_ratio}
    (RESULTS / "overhead.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
