"""Helpers for tests that drive the framework as a user would: the command line, real MLflow stores."""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_rank(rank: int, world: int, port: int, fn: Callable[..., None], args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, *args)
    finally:
        # fn's modules and meshes are garbage now: free them, and the group they hold, while the interpreter is
        # whole. Left to its shutdown, the group's threads aborted a rank ~1 run in 9 ("terminate called without
        # an active exception") after both had returned.
        gc.collect()
        dist.destroy_process_group()


def spawn_gloo(fn: Callable[..., None], world: int, *args: Any) -> None:
    """Run `fn(rank, *args)` on `world` spawned processes joined in a gloo group on 127.0.0.1, one thread each;
    a rank that fails or dies fails the caller. `fn` must be a module-level function (spawn pickles it)."""
    import torch.multiprocessing as mp

    mp.spawn(_gloo_rank, args=(world, free_port(), fn, args), nprocs=world, join=True)


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: int = 300, check: bool = True,
            module: str = "experiments/run.py") -> subprocess.CompletedProcess:
    """`python experiments/run.py <args>` in a subprocess, as a user would type it."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(
        [sys.executable, str(ROOT / module), *args], cwd=ROOT, env=full_env, capture_output=True, text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {args}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def sqlite_uri(outputs: Path) -> str:
    return f"sqlite:///{outputs}/mlflow.db"


def fixed_loss(model, batch: dict, times: int = 10) -> float:
    """A generation module's loss on `batch` over a fixed grid of times t_k = (k + 0.5) / times with fixed noise
    (the validation loss): comparable before and after training."""
    import torch

    model.eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        x1 = model.to_latent(batch)
        losses = [model.loss(batch, t=torch.full((x1.shape[0],), (k + 0.5) / times),
                             noise=torch.randn(x1.shape, generator=g)) for k in range(times)]
    model.train()
    return torch.stack(losses).mean().item()


def fixed_loss_before_and_after(model, held_out: dict, train_clips: list[dict], steps: int = 40,
                                batch_size: int = 8) -> tuple[float, float]:
    """`fixed_loss` on `held_out` before and after `steps` optimizer steps of `model` on `train_clips` (shuffled,
    no validation, no checkpoints): a short training that should lower it."""
    import lightning as L
    from torch.utils.data import DataLoader

    before = fixed_loss(model, held_out, times=8)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    trainer.fit(model, DataLoader(train_clips, batch_size=batch_size, shuffle=True))
    return before, fixed_loss(model, held_out, times=8)
