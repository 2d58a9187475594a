"""The command line as a user types it: help, listing, and errors that name what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from experiments.compose import EXPERIMENTS
from tests.helpers import run_cli


def test_help_lists_config_groups(outputs: Path) -> None:
    out = run_cli("--help").stdout
    for group in ("experiment", "model", "data", "strategy", "trainer", "sweep"):
        assert f"{group}:" in out
    assert "digits_classifier" in out


def test_list_shows_every_experiment(outputs: Path) -> None:
    out = run_cli("list").stdout
    for name in EXPERIMENTS:
        assert name in out


def test_unknown_experiment_names_the_available_ones(outputs: Path) -> None:
    proc = run_cli("experiment=no_such_experiment", check=False)
    assert proc.returncode != 0
    assert "no_such_experiment" in proc.stderr
    assert "digits_classifier" in proc.stderr and "quickstart" in proc.stderr


def test_unknown_config_key_is_named(outputs: Path) -> None:
    proc = run_cli("experiment=digits_classifier", "trainer.max_epochz=3", check=False)
    assert proc.returncode != 0
    assert "max_epochz" in proc.stderr


@pytest.mark.slow  # heavy for the default suite (CI's 20 minutes): python -m pytest -m slow
def test_missing_resume_path_fails_before_training(outputs: Path, tmp_path: Path) -> None:
    proc = run_cli("experiment=digits_classifier", f"ckpt_path={tmp_path}/nope.ckpt", check=False)
    assert proc.returncode != 0
    assert "nope.ckpt: no such checkpoint" in proc.stderr
    assert "Epoch 0" not in proc.stdout + proc.stderr


@pytest.mark.slow  # heavy for the default suite (CI's 20 minutes): python -m pytest -m slow
def test_resume_from_a_different_model_fails_before_training(outputs: Path) -> None:
    run_cli("experiment=digits_classifier", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1", "trainer.limit_test_batches=1")
    proc = run_cli("experiment=digits_classifier", "model.net.width=16", "ckpt_path=last", check=False)
    assert proc.returncode != 0
    assert "does not match the model" in proc.stderr
    assert "checkpoint (32," in proc.stderr and "model (16," in proc.stderr
    assert "Epoch 0" not in proc.stdout + proc.stderr


def test_slurm_launcher_config_matches_the_trainer(outputs: Path) -> None:
    out = run_cli("experiment=digits_classifier", "hydra/launcher=slurm", "trainer.devices=4", "trainer.num_nodes=2",
                  "--cfg", "all", "--resolve").stdout
    assert "SlurmLauncher" in out
    # one SLURM task per device, so Lightning's SLURM detection starts the ranks
    assert "tasks_per_node: 4" in out and "nodes: 2" in out


def test_runs_started_together_get_their_own_folders(outputs: Path) -> None:
    """Two runs of one experiment started in the same second must not share a folder (nor its last.ckpt); the
    ranks of a torchrun job (RANK set) must."""
    import os
    import re
    import subprocess
    import sys

    from tests.helpers import ROOT

    def start(env: dict[str, str]) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(ROOT / "experiments/run.py"), "experiment=digits_classifier",
                                 "--cfg", "all", "--resolve"], cwd=ROOT, env={**os.environ, **env},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    procs = [start({}), start({}), start({"RANK": "0"})]
    folders = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        (line,) = [line for line in out.splitlines() if line.strip().startswith("dir:") and "/runs/" in line]
        folders.append(line.rsplit("/", 1)[1].strip())
    stamp = r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d"
    for proc, folder in zip(procs[:2], folders[:2]):
        assert re.fullmatch(f"{stamp}_{proc.pid}", folder), folder
    assert re.fullmatch(stamp, folders[2]), folders[2]
