"""`task=sample` and `task=evaluate` from a sharded (FSDP2 / DCP) checkpoint folder: a tiny quickstart trained
by 2 gloo processes with `strategy=fsdp`, then sampled and evaluated in one process without a process group.
The weights the tasks run with must be the checkpoint's (its EMA for parameters, as from a single-file
checkpoint), not the initialisation."""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
from mlflow.tracking import MlflowClient
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from callbacks.ema import read_ema_state
from datamodules.media import decode_video
from experiments.compose import compose_config
from experiments.runner import ConfigError, _load_weights, resolve_ckpt_path, run
from lightning_modules.generation import GenerationModule
from tests.helpers import run_cli, sqlite_uri

# The quickstart at a few seconds: a tiny world and DiT, 2 optimizer steps, no validation, no test loop.
# EMA decay 0.5 so that the EMA is clearly not the training weights after 2 steps.
SMALL = ["experiment=quickstart", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
         "data.world.scenes=[8,4]", "data.world.images=[2,1]", "+data.world.seed=9", "data.batch_size=2",
         "data.val_batch_size=null",
         "data.epoch_batches=2", "data.num_workers=0", "trainer.max_steps=2", "trainer.limit_val_batches=0",
         "test_after_fit=false", "callbacks.media=null", "callbacks.ema.decay=0.5",
         "model.net.dim=32", "model.net.depth=2", "model.net.heads=2", "model.net.ffn_dim=64",
         "model.conditioners.text.encoder.encoders.word.dim=32", "model.conditioners.text.encoder.encoders.word.depth=1",
         "model.conditioners.text.encoder.encoders.word.heads=2", "model.sampler.steps=2", "model.sample.batch_size=2"]


def fresh_module(overrides: list[str], out: Path) -> GenerationModule:
    """The module as `run()` builds it for these overrides (same seed, so the same initialisation)."""
    cfg = compose_config(overrides, out)
    L.seed_everything(cfg.seed)
    return hydra.utils.instantiate(cfg.model, _convert_="object")


@pytest.mark.slow  # ~45 s of CI's 20 minutes; test_distributed.py keeps the sharded save and resume by default
def test_sample_and_evaluate_from_fsdp_sharded_checkpoint(outputs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small = [*SMALL, f"data.data_dir={tmp_path / 'data'}"]
    # trained with activation checkpointing, sampled without it: the names must still match
    run_cli(*small, "strategy=fsdp", "trainer.devices=2", "strategy.parallel.activation_checkpointing=true",
            env={"OMP_NUM_THREADS": "1"})
    (folder,) = (outputs / "quickstart").glob("runs/*/checkpoints/last.ckpt")
    assert folder.is_dir() and {"__0_0.distcp", "__1_0.distcp", ".metadata", "meta.pt"} <= {p.name for p in folder.iterdir()}

    # The reference: the same checkpoint consolidated by torch's own converter into one Lightning file.
    dcp_to_torch_save(folder, tmp_path / "consolidated.pt")
    trained = torch.load(tmp_path / "consolidated.pt", weights_only=True)["state_dict"]
    full_file = tmp_path / "full.ckpt"
    torch.save({**torch.load(folder / "meta.pt", weights_only=True), "state_dict": trained}, full_file)
    ema = read_ema_state(folder)
    assert ema is not None, "the EMA callback's state is in the sharded checkpoint's meta.pt"

    # 1. _load_weights alone: the plain module gets exactly the trained weights, which are not the initialisation.
    module = fresh_module(small, tmp_path / "job")
    init = {k: v.clone() for k, v in module.state_dict().items()}
    loaded = _load_weights(module, str(folder)).state_dict()
    assert loaded.keys() == trained.keys()
    for name, tensor in trained.items():
        assert torch.equal(loaded[name], tensor), name
    changed = [k for k in trained if not torch.equal(trained[k], init[k])]
    assert len(changed) > len(trained) // 2, "2 AdamW steps change most tensors; the load must show it"

    # 2. task=sample end to end, in this process, from the folder and from the equivalent single file.
    seen: list[dict[str, torch.Tensor]] = []
    original = GenerationModule.sample_to_files

    def recording(self, trainer):
        seen.append({k: v.detach().clone() for k, v in self.state_dict().items()})
        return original(self, trainer)

    original_test_start = GenerationModule.on_test_start

    def recording_test_start(self) -> None:
        seen.append({k: v.detach().clone() for k, v in self.state_dict().items()})
        return original_test_start(self)

    monkeypatch.setattr(GenerationModule, "sample_to_files", recording)
    monkeypatch.setattr(GenerationModule, "on_test_start", recording_test_start)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("A small red circle bounces around.\nA small blue star sits still.\n")
    for ckpt, name in ((folder, "from_folder"), (full_file, "from_file")):
        run(compose_config([*small, "task=sample", f"ckpt_path={ckpt}", f"model.sample.prompts={prompts}",
                            f"model.sample.output_dir={tmp_path / name}"], outputs / name))
    from_folder, from_file = seen
    params = {n for n, p in module.named_parameters() if p.requires_grad}
    for name, tensor in from_folder.items():
        assert torch.equal(tensor, from_file[name]), f"{name}: folder and file checkpoints sample differently"
        expected = ema["shadow"][name] if name in params else trained[name]  # EMA for parameters, as from a file
        assert torch.equal(tensor, expected), name
    assert any(not torch.equal(ema["shadow"][n], trained[n]) for n in params), "the EMA differs from the weights"
    assert sum(not torch.equal(from_folder[k], init[k]) for k in init) > len(init) // 2

    videos = {name: sorted((tmp_path / name).glob("*.mp4")) for name in ("from_folder", "from_file")}
    assert [p.name for p in videos["from_folder"]] == ["000_a_small_red_circle_bounces_around.mp4",
                                                         "001_a_small_blue_star_sits_still.mp4"]
    for a, b in zip(videos["from_folder"], videos["from_file"]):
        frames = decode_video(a).frames
        assert frames.shape[0] == 8
        assert torch.equal(torch.as_tensor(frames), torch.as_tensor(decode_video(b).frames))

    # 3. task=evaluate from the folder: held-out samples and probe metrics, into the checkpoint's MLflow run.
    run(compose_config([*small, "task=evaluate", f"ckpt_path={folder}", "data.val_batches=1",
                        "trainer.limit_test_batches=1", "model.evaluators.probe.steps=2",
                        "model.evaluators.samples.count=1", f"model.evaluators.probe.cache_dir={tmp_path / 'probes'}"],
                       outputs / "evaluate"))
    assert len(seen) == 3, "evaluate ran with the same weights as sample"
    assert all(torch.equal(seen[2][k], from_folder[k]) for k in from_folder)
    client = MlflowClient(sqlite_uri(outputs))
    (fit_run,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert {"eval/alignment", "eval/fd"} <= set(fit_run.data.metrics)


def test_folder_that_is_not_a_checkpoint_is_refused(tmp_path: Path, outputs: Path) -> None:
    folder = tmp_path / "not_a_checkpoint"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    cfg = compose_config(["experiment=quickstart", "task=sample", f"ckpt_path={folder}"], outputs / "job")
    with pytest.raises(ConfigError, match=f"ckpt_path={folder} is a folder but not a sharded"):
        resolve_ckpt_path(cfg)
    with pytest.raises(ConfigError, match=str(folder)):
        _load_weights(torch.nn.Linear(2, 2), str(folder))


def test_file_checkpoint_loads_across_activation_checkpointing_names(tmp_path: Path) -> None:
    """A file written with activation checkpointing (DDP: names hold `_checkpoint_wrapped_module.`) loads into
    the plain module; a missing tensor is an error naming it, not a silent partial load."""
    torch.manual_seed(0)
    trained = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    wrapped = {k.replace("0.", "0._checkpoint_wrapped_module.", 1): v for k, v in trained.state_dict().items()}
    torch.save({"state_dict": wrapped}, tmp_path / "wrapped.ckpt")
    plain = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    _load_weights(plain, str(tmp_path / "wrapped.ckpt"))
    for name, tensor in trained.state_dict().items():
        assert torch.equal(plain.state_dict()[name], tensor), name
    torch.save({"state_dict": {k: v for k, v in wrapped.items() if k != "1.bias"}}, tmp_path / "partial.ckpt")
    with pytest.raises(ConfigError, match=r"missing in checkpoint \['1.bias'\]"):
        _load_weights(plain, str(tmp_path / "partial.ckpt"))
