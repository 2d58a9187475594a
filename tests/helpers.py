"""Helpers for tests that drive the framework as a user would: the command line, real MLflow stores."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
