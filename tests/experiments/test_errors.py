"""Errors that are the user's print one line that names the key or file and says what to do, without a traceback;
the traceback goes to the job's run.log. A failed run's closing lines say what failed and whether resuming makes
sense. The skip policy stops a run whose loss keeps being non-finite, and no sentinel value reaches MLflow.

The jobs run in-process through `experiments.run.run_job` (what the command line runs per job), so each case
costs its config and at most a few training steps; `test_cli_prints_one_line` checks the real command line once."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import experiments.runner  # noqa: F401 - Lightning's log handlers take the session's stderr, not one test's
from experiments.compose import compose_config
from experiments.run import run_job
from tests.datamodules.helpers import good_shards, truncate
from tests.helpers import run_cli, sqlite_uri

pytestmark = pytest.mark.usefixtures("one_thread")

DIGITS = ["experiment=digits_classifier", "trainer.enable_progress_bar=false", "test_after_fit=false",
          "trainer.log_every_n_steps=1"]


def fail(outputs: Path, capfd: pytest.CaptureFixture, *overrides: str) -> tuple[str, str, str]:
    """Run one job that must fail as the user's error: (the one error line, the console, its run.log)."""
    job = outputs / "job"
    cfg = compose_config(list(overrides), job)
    with pytest.raises(SystemExit) as exit_:
        run_job(cfg)
    assert exit_.value.code == 1
    captured = capfd.readouterr()
    console = captured.out + captured.err
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, captured.err
    assert "Traceback" not in console
    message = captured.err[captured.err.index("error:"):].rstrip("\n")
    assert "\n" not in message, message  # one line, the last one
    run_log = (job / "run.log").read_text()
    assert "Traceback (most recent call last)" in run_log and message in run_log
    return message, console, run_log


@pytest.mark.parametrize(("override", "expected"), [
    ("trainer.max_steps=abc", "error: trainer.max_steps=abc: expected an integer"),
    ("trainer.max_epochs=2.5", "error: trainer.max_epochs=2.5: expected an integer"),
    ("model.optimizer.lr=-0.001", "error: model.optimizer.lr=-0.001: must be >= 0"),
    ("model.optimizer.lr=fast", "error: model.optimizer.lr=fast: expected a number"),
    ("callbacks.checkpoint.save_last=sometimes", "error: callbacks.checkpoint.save_last=sometimes: expected"),
    ("ckpt_path=/no/such/last.ckpt", "error: ckpt_path=/no/such/last.ckpt: no such checkpoint"),
    ("callbacks.nonfinite.policy=ignore", "error: callbacks.nonfinite.policy='ignore'; choose stop or skip"),
])
def test_config_errors_are_one_line_naming_the_key(override: str, expected: str, outputs: Path,
                                                    capfd: pytest.CaptureFixture) -> None:
    message, _, _ = fail(outputs, capfd, *DIGITS, override)
    assert message.startswith(expected), message


def test_dp_config_error_is_one_line(outputs: Path, capfd: pytest.CaptureFixture) -> None:
    message, _, _ = fail(outputs, capfd, "experiment=dp_digits_unbalanced", "dp=dpsgd", "trainer.gradient_clip_val=1.0")
    assert message.startswith("error: trainer.gradient_clip_val must be null under DP"), message


def test_nonfinite_stop_says_resuming_would_fail_the_same_way(outputs: Path, capfd: pytest.CaptureFixture) -> None:
    message, console, _ = fail(outputs, capfd, *DIGITS, "model.optimizer.lr=1e30", "model.scheduler=null",
                               "trainer.max_steps=5")
    assert "non-finite training loss" in message and "model.optimizer.lr" in message
    assert "failed:      NonFiniteLossError at step" in console
    assert "the same steps would diverge again: lower model.optimizer.lr" in console  # resuming as is: no use


def test_skip_policy_with_an_exploding_learning_rate_stops_and_logs_no_sentinel(
        outputs: Path, capfd: pytest.CaptureFixture) -> None:
    """lr = 1e30: the first step blows the weights up, every later loss is non-finite. The run used to skip 29 of
    30 steps, end FINISHED without a word and log train/loss = 1.797e308."""
    message, console, _ = fail(outputs, capfd, *DIGITS, "model.optimizer.lr=1e30", "model.scheduler=null",
                               "trainer.max_steps=30", "callbacks.nonfinite.policy=skip")
    assert "callbacks.nonfinite.max_consecutive" in message and "5 training steps in a row" in message
    assert console.count("step skipped") == 4  # warned at each skip, the 5th stops the run
    client = MlflowClient(sqlite_uri(outputs))
    (run,) = client.search_runs([client.get_experiment_by_name("digits_classifier").experiment_id])
    assert run.info.status == "FAILED"
    values = [m.value for key in run.data.metrics for m in client.get_metric_history(run.info.run_id, key)]
    assert values and all(abs(v) < 1e300 for v in values)
    assert run.data.metrics["train/nonfinite_skipped"] == 4


def test_bad_data_error_from_a_worker_is_one_line_naming_the_shard(tmp_path: Path, outputs: Path,
                                                                   capfd: pytest.CaptureFixture) -> None:
    shards = good_shards(tmp_path / "shards", 1, 2)
    truncate(Path(shards[0]), 0.01)  # nothing readable left
    message, console, _ = fail(outputs, capfd, "experiment=quickstart", f"data.shards={tmp_path}/shards",
                               f"data.val_shards={tmp_path}/shards", "data.num_workers=1", "trainer.max_steps=2",
                               "trainer.enable_progress_bar=false", "test_after_fit=false")
    assert message.startswith("error: no readable samples in any shard"), message
    assert "shard-000000.tar" in message
    assert "fix or remove the shard named below" in console


def test_cli_prints_one_line(outputs: Path) -> None:
    proc = run_cli("experiment=digits_classifier", "trainer.max_steps=abc", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: trainer.max_steps=abc: expected an integer")
    assert "Traceback" not in proc.stdout + proc.stderr


def test_a_resume_that_fails_at_once_leaves_the_finished_run_finished(outputs: Path, capfd: pytest.CaptureFixture) -> None:
    from experiments.runner import run

    short = [*DIGITS, "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1"]
    run(compose_config(short, outputs / "first"))
    client = MlflowClient(sqlite_uri(outputs))
    (finished,) = client.search_runs([client.get_experiment_by_name("digits_classifier").experiment_id])
    assert finished.info.status == "FINISHED"
    capfd.readouterr()
    message, console, _ = fail(outputs, capfd, *short, "trainer.max_epochs=2", "dp=dpsgd", "trainer.gradient_clip_val=1.0",
                               f"ckpt_path={outputs / 'first' / 'checkpoints' / 'last.ckpt'}")
    assert "trainer.gradient_clip_val must be null under DP" in message
    assert f"run {finished.info.run_id} stays FINISHED" in console
    assert client.get_run(finished.info.run_id).info.status == "FINISHED"
