"""Real multi-process runs on CPU with gloo: DDP, FSDP2 (sharded checkpoints, resume), two simulated nodes
under torchrun, and a DDP multirun that must not start the sweep again in its child processes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.experiments.test_sharded_sample import SMALL
from tests.helpers import ROOT, free_port, run_cli, sqlite_uri

# No LR schedule: a cosine schedule restored from a 1-epoch run would hold the LR at 0 in epoch 2.
TINY = ["experiment=digits_classifier", "model.scheduler=null", "trainer.accelerator=cpu", "trainer.limit_train_batches=4",
        "trainer.limit_val_batches=2", "trainer.limit_test_batches=2", "trainer.enable_progress_bar=false"]


def epochs_logged(outputs: Path, run) -> set[int]:
    history = MlflowClient(sqlite_uri(outputs)).get_metric_history(run.info.run_id, "epoch")
    return {int(m.value) for m in history}


def finished_runs(outputs: Path, experiment: str = "digits_classifier") -> list:
    client = MlflowClient(sqlite_uri(outputs))
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return [r for r in runs if r.info.status == "FINISHED"]


# Slow (CI's 20 minutes): the default suite covers two-process DDP training in
# tests/privacy/test_runs.py and two-process resume in the FSDP test below.
@pytest.mark.slow
def test_ddp_two_processes_train_and_resume(outputs: Path) -> None:
    run_cli(*TINY, "strategy=ddp", "trainer.devices=2", "trainer.max_epochs=1")
    (ckpt,) = (outputs / "digits_classifier").glob("runs/*/checkpoints/last.ckpt")
    assert ckpt.is_file()
    run_cli(*TINY, "strategy=ddp", "trainer.devices=2", "trainer.max_epochs=2", "ckpt_path=last")
    (run,) = finished_runs(outputs)  # resumed into the same MLflow run
    assert {0, 1} <= epochs_logged(outputs, run)


def test_fsdp_two_processes_sharded_checkpoint_and_resume(outputs: Path) -> None:
    run_cli(*TINY, "strategy=fsdp", "trainer.devices=2", "trainer.max_epochs=1")
    (ckpt,) = (outputs / "digits_classifier").glob("runs/*/checkpoints/last.ckpt")
    assert ckpt.is_dir(), "FSDP2 writes a sharded (DCP) checkpoint folder"
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= {p.name for p in ckpt.iterdir()}
    run_cli(*TINY, "strategy=fsdp", "trainer.devices=2", "trainer.max_epochs=2", "ckpt_path=last",
            "strategy.parallel.activation_checkpointing=true")
    (run,) = finished_runs(outputs)
    assert {0, 1} <= epochs_logged(outputs, run)
    val_loss = [m.value for m in sorted(MlflowClient(sqlite_uri(outputs)).get_metric_history(run.info.run_id, "val/loss"), key=lambda m: m.step)]
    assert val_loss[-1] < val_loss[0], "training continued from the sharded checkpoint"


@pytest.mark.slow  # heavy for the default suite (CI's 20 minutes): python -m pytest -m slow
def test_two_simulated_nodes_under_torchrun(outputs: Path) -> None:
    port = str(free_port())
    args = [*TINY, "strategy=ddp", "trainer.devices=1", "trainer.num_nodes=2", "trainer.max_epochs=1",
            "hydra.run.dir=" + str(outputs / "two_nodes")]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}",
             "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
             str(ROOT / "experiments/run.py"), *args],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in (0, 1)
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs[0][-3000:] + logs[1][-3000:]
    assert "world_size: 2" in logs[0] or "GLOBAL_RANK: 0, MEMBER: 1/2" in logs[0]
    assert len(finished_runs(outputs)) == 1  # one MLflow run, written by global rank 0


@pytest.mark.slow  # heavy for the default suite (CI's 20 minutes): python -m pytest -m slow
def test_ddp_multirun_runs_each_job_once(outputs: Path) -> None:
    run_cli("-m", *TINY, "strategy=ddp", "trainer.devices=2", "trainer.max_epochs=1", "seed=0,1")
    sweeps = list((outputs / "digits_classifier" / "multiruns").iterdir())
    assert len(sweeps) == 1, sweeps
    jobs = sorted(p.name for p in sweeps[0].iterdir() if p.is_dir())
    assert jobs == ["0", "1"]
    runs = finished_runs(outputs)
    assert sorted(r.data.params["seed"] for r in runs if "seed" in r.data.params) == ["0", "1"]


@pytest.mark.slow
@pytest.mark.parametrize("split", ["strategy.tensor_parallel_size=2", "strategy.context_parallel_size=2"])
def test_tensor_or_context_parallel_quickstart_trains_resumes_and_samples_in_one_process(
        outputs: Path, tmp_path: Path, split: str) -> None:
    """The reduced quickstart with its DiT split over 2 gloo processes (FSDP x TP, or CP): it trains, resumes
    from its sharded checkpoint into the same MLflow run, and a plain process samples from that checkpoint.
    Muon's state goes through the sharded checkpoint, and RoPE turns each context-parallel chunk."""
    from tests.lightning_modules.test_generation import QUICK

    args = [*QUICK, "test_after_fit=false", f"data.data_dir={tmp_path / 'data'}", "strategy=fsdp",
            "trainer.devices=2", "strategy.parallel.meta_init=false", split]
    run_cli(*args, timeout=900)
    (run,) = finished_runs(outputs, "quickstart")
    client = MlflowClient(sqlite_uri(outputs))
    first = max(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
    run_cli(*[a for a in args if not a.startswith("trainer.max_steps")], "trainer.max_steps=10", "ckpt_path=last",
            timeout=900)
    (run,) = finished_runs(outputs, "quickstart")
    resumed = max(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert resumed > first, "the resumed run logged its further steps into the same MLflow run"
    (ckpt,) = outputs.glob("quickstart/runs/*/checkpoints/last.ckpt")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("A red circle moves right, on a plain navy background.\n")
    run_cli(*QUICK, f"data.data_dir={tmp_path / 'data'}", "task=sample", f"ckpt_path={ckpt}",
            f"model.sample.prompts={prompts}", f"model.sample.output_dir={tmp_path / 'samples'}", timeout=600)
    assert list((tmp_path / "samples").glob("*.mp4"))


@pytest.mark.slow
def test_meta_init_with_tensor_parallel_on_cpu_says_what_to_set(outputs: Path, tmp_path: Path) -> None:
    from tests.lightning_modules.test_generation import QUICK

    result = run_cli(*QUICK, f"data.data_dir={tmp_path / 'data'}", "strategy=fsdp", "trainer.devices=2",
                     "strategy.tensor_parallel_size=2", check=False, timeout=600)
    assert result.returncode != 0
    assert "strategy.parallel.meta_init=false" in result.stdout + result.stderr




def printed_metrics(stdout: str) -> dict[str, float]:
    """The test metrics table the run prints (Lightning's), as {name: value}."""
    rows = re.findall(r"│\s*(\S+/\S+)\s*│\s*(\S+)\s*│", stdout)
    return {name: float(value) for name, value in rows}


def test_evaluation_under_ddp_scores_as_one_process(outputs: Path, tmp_path: Path) -> None:
    """`task=evaluate` on 2 gloo processes prints what one process prints. Each rank samples every held-out prompt
    (a held-out shard is not split) with the same seeds, and rank 0's scores are logged: its Fréchet distances must
    be over its own sets, not synced with the other rank's by torchmetrics (which made the DDP quickstart's floor
    6.5 against 33)."""
    small = [*SMALL, f"data.data_dir={tmp_path / 'data'}", "model.evaluators.probe.steps=20",
             f"model.evaluators.probe.cache_dir={tmp_path / 'probes'}"]
    run_cli(*small)  # 2 steps, no test loop
    (ckpt,) = (outputs / "quickstart").glob("runs/*/checkpoints/last.ckpt")
    one, two = (printed_metrics(run_cli(*small, "task=evaluate", f"ckpt_path={ckpt}", *processes,
                                        env={"OMP_NUM_THREADS": "1"}).stdout)
                for processes in ([], ["strategy=ddp", "trainer.devices=2"]))
    assert {"eval/fd", "eval/fd_real_floor", "eval/alignment_real", "eval/area_cv"} <= one.keys()
    assert one["eval/fd_samples"] == 4  # data.world.scenes=[8,4]: 4 held-out prompts
    assert two == pytest.approx(one, rel=1e-5)
