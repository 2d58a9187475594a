"""A run killed after a checkpoint and resumed ends exactly where an uninterrupted run ends, in the same
MLflow run."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from tests.helpers import run_cli, sqlite_uri

# 1,257 training digits / 64 = 20 batches per epoch; checkpoints every 5 steps, so a kill at step 13
# resumes from step 10, in the middle of the first epoch.
RUN = ["experiment=digits_classifier", "trainer.max_epochs=2", "trainer.enable_progress_bar=false",
       "callbacks.checkpoint.every_n_epochs=null", "callbacks.checkpoint.every_n_train_steps=5"]


def test_killed_run_resumes_to_the_same_metrics(outputs: Path) -> None:
    run_cli(*RUN, "experiment_name=uninterrupted")
    killed = run_cli(*RUN, "experiment_name=killed", "+callbacks.kill._target_=tests.kill_at_step.KillAtStep",
                     "+callbacks.kill.step=13", check=False)
    assert killed.returncode != 0  # SIGKILL: no cleanup, no final checkpoint
    run_cli(*RUN, "experiment_name=killed", "ckpt_path=last")

    client = MlflowClient(sqlite_uri(outputs))
    (reference,) = client.search_runs([client.get_experiment_by_name("uninterrupted").experiment_id])
    (resumed,) = client.search_runs([client.get_experiment_by_name("killed").experiment_id])
    assert resumed.info.status == "FINISHED"
    for key in ("test/acc", "test/loss", "val/loss", "val/acc"):
        assert abs(resumed.data.metrics[key] - reference.data.metrics[key]) < 1e-6, key
    # the resumed run is the killed one: its loss history starts before the kill
    steps = [m.step for m in client.get_metric_history(resumed.info.run_id, "train/loss")]
    assert min(steps) < 10 and max(steps) > 13
