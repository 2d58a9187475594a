"""A run killed (SIGKILL) after a checkpoint and resumed has, metric for metric and step for step, the history of an
uninterrupted run, in the same MLflow run; a finished run resumed with a larger step budget goes on.

One kill-and-resume test per experiment family: digits and text-to-video (quickstart) in the default suite;
DP, the TAE, the upsampler and text-to-video on a latent cache under `-m slow`."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import run_cli, sqlite_uri

KILL = "+callbacks.kill._target_=tests.kill_at_step.KillAtStep"


def history(client: MlflowClient, experiment: str) -> tuple[object, dict[str, list[tuple[int, float]]]]:
    """The experiment's one run and its full metric history: key -> sorted (step, value), repeats included."""
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run, {key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
                 for key in run.data.metrics}


def kill_and_resume(outputs: Path, run: list[str], kill_at: int) -> tuple[object, object]:
    """Run `run` uninterrupted; run it again, SIGKILLed after step `kill_at`, and resume it with ckpt_path=last.
    Returns the two MLflow runs after checking that their full histories are equal."""
    run_cli(*run, "experiment_name=uninterrupted")
    killed = run_cli(*run, "experiment_name=killed", KILL, f"+callbacks.kill.step={kill_at}", check=False)
    assert killed.returncode != 0  # SIGKILL: no cleanup, no final checkpoint
    run_cli(*run, "experiment_name=killed", "ckpt_path=last")

    client = MlflowClient(sqlite_uri(outputs))
    reference, expected = history(client, "uninterrupted")
    resumed, got = history(client, "killed")
    assert resumed.info.status == "FINISHED"
    assert sorted(got) == sorted(expected)
    for key in expected:
        assert got[key] == expected[key], key  # every step, no value missing or repeated
    assert reference.info.run_name != resumed.info.run_name  # unique names, though the seed is the same
    return reference, resumed


# 1,257 training digits / 64 = 20 batches per epoch; checkpoints every 5 steps, so a kill at step 13
# resumes from step 10, in the middle of the first epoch.
DIGITS = ["experiment=digits_classifier", "trainer.max_epochs=2", "trainer.enable_progress_bar=false",
          "callbacks.checkpoint.every_n_epochs=null", "callbacks.checkpoint.every_n_train_steps=5"]


@pytest.mark.slow  # the digits run; the quickstart's killed-run test below keeps exact resume in the default suite
def test_killed_run_resumes_to_the_same_metrics(outputs: Path) -> None:
    _, resumed = kill_and_resume(outputs, DIGITS, kill_at=13)
    # the resumed run is the killed one: its loss history starts before the kill
    steps = [m.step for m in MlflowClient(sqlite_uri(outputs)).get_metric_history(resumed.info.run_id, "train/loss")]
    assert min(steps) < 10 and max(steps) > 13


# The quickstart at a test's size: epochs of 4 batches, validation (with media) after each, a checkpoint every
# 4 steps. Killed after step 6, it resumes from step 4: the end of epoch 0, after its validation. On the way,
# the time samples, noise and caption dropout drawn after the resume, the data position, the worker seeds, the
# EMA, the validation that followed the checkpoint, the logging step and the metrics the killed run had already
# sent must all come out as in the uninterrupted run.
QUICKSTART = ["experiment=quickstart", "trainer.max_steps=12", "data.epoch_batches=4", "data.val_batches=1",
              "data.batch_size=4", "data.val_batch_size=null", "trainer.check_val_every_n_epoch=1",
              "callbacks.checkpoint.every_n_epochs=null",
              "callbacks.checkpoint.every_n_train_steps=4", "test_after_fit=false", "trainer.log_every_n_steps=1",
              "trainer.enable_progress_bar=false", "model.media.steps=2", "model.val_times=2",
              "data.num_workers=1"]  # the quickstart decodes in its own process; a worker's seeds must resume too


def test_quickstart_killed_run_resumes_to_the_same_history(outputs: Path) -> None:
    kill_and_resume(outputs, QUICKSTART, kill_at=6)


FAMILIES = {
    # Poisson batches of ~128 of 995 digits: 8 steps an epoch; checkpoint at 5, killed at 7.
    "dp": ["experiment=dp_digits_unbalanced", "dp=dpsgd", "trainer.max_epochs=2", "callbacks.checkpoint.every_n_epochs=null",
           "callbacks.checkpoint.every_n_train_steps=5", "callbacks.dp_monitor.every_n_steps=2", "test_after_fit=false"],
    # image steps every 4th step, the posterior sampled: checkpoint at 6 (mid-epoch), killed at 7.
    "tae": ["experiment=tae_tiny", "trainer.max_steps=10", "data.epoch_batches=4", "data.val_batches=1",
            "data.batch_size=4", "trainer.check_val_every_n_epoch=1", "callbacks.checkpoint.every_n_epochs=null",
            "callbacks.checkpoint.every_n_train_steps=3", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false"],
    "upsampler": ["experiment=upsampler_tiny", "trainer.max_steps=10", "data.epoch_batches=4", "data.val_batches=1",
                  "data.batch_size=4", "trainer.check_val_every_n_epoch=1", "callbacks.checkpoint.every_n_epochs=null",
                  "callbacks.checkpoint.every_n_train_steps=3", "test_after_fit=false", "trainer.log_every_n_steps=1",
                  "trainer.enable_progress_bar=false", "model.media.steps=2", "model.val_times=2",
                  "model.sampler.steps=2"],
}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_killed_run_resumes_to_the_same_history(family: str, outputs: Path) -> None:
    kill_and_resume(outputs, FAMILIES[family], kill_at=7)


@pytest.mark.slow
def test_latent_cache_killed_run_resumes_to_the_same_history(outputs: Path, tmp_path: Path) -> None:
    """Text-to-video on a TAE latent cache: a 2-step TAE, its cache (encoded by the first run), then the DiT on it."""
    run_cli("experiment=tae_tiny", "trainer.max_steps=2", "data.epoch_batches=2", "data.val_batches=1",
            "trainer.enable_progress_bar=false")
    run = ["experiment=t2v_latents_tiny", f"data.cache_dir={tmp_path / 'latents'}", "trainer.max_steps=10",
           "data.epoch_batches=4", "data.val_batches=1", "data.batch_size=4", "trainer.check_val_every_n_epoch=1",
           "callbacks.checkpoint.every_n_epochs=null", "callbacks.checkpoint.every_n_train_steps=3",
           "test_after_fit=false", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
           "model.media.steps=2", "model.val_times=2"]
    kill_and_resume(outputs, run, kill_at=7)


@pytest.mark.slow  # heavy for the default suite (CI's 20 minutes): python -m pytest -m slow
def test_finished_run_extended_with_a_larger_budget(outputs: Path) -> None:
    """A finished quickstart run resumed with trainer.max_steps raised: OneCycleLR refused ("Tried to step 5
    times") and the run was marked FAILED; now the schedule is rebuilt for the new length and the run goes on."""
    short = [*QUICKSTART[:1], "trainer.max_steps=4", *QUICKSTART[2:]]
    run_cli(*short)
    client = MlflowClient(sqlite_uri(outputs))
    (first,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert first.info.status == "FINISHED"
    extended = run_cli(*QUICKSTART[:1], "trainer.max_steps=8", *QUICKSTART[2:], "ckpt_path=last")
    assert "the schedule is rebuilt for the new length from step 4" in extended.stdout + extended.stderr
    (run,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert run.info.run_id == first.info.run_id and run.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert steps == list(range(8))
    lrs = sorted(client.get_metric_history(run.info.run_id, "lr-AdamW"), key=lambda m: m.step)
    assert lrs[4].value > lrs[3].value  # the 4-step schedule had ended near 0; the 8-step one is at its middle
