"""Every experiment config composes, and runs one training step (fast_dev_run) end to end."""

from __future__ import annotations

import math
from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from datamodules.synthetic import WorldConfig
from datamodules.synthetic.generate import make_scene
from experiments.compose import EXPERIMENTS, compose_config
from experiments.runner import run, threads_per_process


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes(experiment: str, outputs: Path) -> None:
    cfg = compose_config([f"experiment={experiment}"], outputs / "job")
    assert cfg.experiment_name
    assert "_target_" in cfg.model and "_target_" in cfg.data


# Paper-size experiments (names ending in _moviegen) take minutes and many GB for one CPU step: `-m slow`. So do,
# for CI's 20 minutes, the latent-cache experiment (it encodes a cache first) and the teachers that only change
# stage 2's recipe (their configs still compose in the default suite).
# quickstart_long is the quickstart with more steps (its one step is the quickstart's). The quickstart's one step
# also trains its probe (its end-to-end test in test_generation.py runs the reduced quickstart); AVID's stage 1 is
# stage 2's model without the guidance (test_avid.py builds both). tae_tiny runs from the command line in
# test_tae_training.py (fast_dev_run, and a killed run resumed with -m slow); the upsampler trains and samples in
# fused windows in test_generation.py. The editing stages (~35 CPU s each) train a step of each pair kind in
# tests/lightning_modules/test_editing.py.
HEAVY = {"quickstart_long", "t2v_latents_tiny", "sticker_teacher_first", "sticker_teacher_moving", "avid_motion",
         "tae_tiny", "upsampler_tiny", "edit_stage1", "edit_stage2", "edit_stage3", "edit_supervised",
         "edit_upright_stage2", "edit_upright_stage3", "edit_upright_supervised",  # stage1's step: their DiT
         "audio_ae", "audio_v2a"}  # audio: test_audio.py samples, windows and muxes by default
ONE_STEP = [pytest.param(e, marks=pytest.mark.slow) if e.endswith("_moviegen") or e in HEAVY else e
            for e in EXPERIMENTS]
# The paper-size model on a smaller clip in fp32, so one CPU step fits in memory (256² x 32 frames needs > 24 GiB)
# and time (bf16 autocast of 3D convolutions on a CPU took over 25 minutes for a 64² x 16 clip).
CPU_CLIP = {"tae_moviegen": ["data.sizes=[[32,32]]", "data.frames=[8]", "data.num_workers=0", "trainer.precision=32-true"]}
# The stickers' and AVID's world, shrunk: one step needs a few clips, not the 1700 the experiments train on.
SMALL_WORLD = ["data.world.scenes=[16,8]", "data.world.images=[16,8]", "data.world.stickers=[16,8]"]
CPU_CLIP |= {e: SMALL_WORLD for e in EXPERIMENTS if e.startswith(("sticker_", "avid_"))}
CPU_CLIP["sticker_student"] = [*SMALL_WORLD, "data.shards=null"]  # not the ensemble's selected set
# Movie Gen Audio without a trained audio autoencoder (a random one): the one step checks the wiring.
CPU_CLIP["audio_v2a"] = ["model.codec.checkpoint=null", "model.sampler.steps=2", "model.media.steps=2",
                         "data.world.scenes=[16,8]"]
# Personalization's identities world, shrunk: 4 training identities and 2 held-out ones.
CPU_CLIP |= {e: ["data.world.identities=4", "data.world.held_out_identities=2", "data.world.clips_per_identity=[3,2]",
                 "model.sampler.steps=5"] for e in EXPERIMENTS if e.startswith("pt2v_")}

# The quickstart on a world of 16 + 8 scenes (its one step builds the world), and the experiments beside it.
CPU_CLIP["quickstart"] = ["data.world.scenes=[16,8]", "data.world.images=[16,8]"]
CPU_CLIP |= {e: CPU_CLIP["quickstart"] for e in ("quickstart_long", "t2v_tiny", "t2v_upright")}

# Editing's world, shrunk: 16 training and 8 held-out edit pairs.
CPU_CLIP |= {e: ["data.world.edits=[16,8]", "model.sampler.steps=5", "model.backtranslation_steps=2"]
             for e in EXPERIMENTS if e.startswith("edit_")}


@pytest.mark.parametrize("experiment", ONE_STEP)
def test_experiment_runs_one_step(experiment: str, outputs: Path) -> None:
    cfg = compose_config(
        [f"experiment={experiment}", "trainer.fast_dev_run=true", "trainer.accelerator=cpu", "trainer.devices=1",
         "trainer.enable_progress_bar=false", *CPU_CLIP.get(experiment, [])],
        outputs / "job",
    )
    default_store = Path("mlflow.db")  # MLflow's default store in the working directory: no run may create it
    before = default_store.stat().st_mtime_ns if default_store.exists() else None
    run(cfg)
    after = default_store.stat().st_mtime_ns if default_store.exists() else None
    assert after == before, "a fast_dev_run (which logs nothing) wrote ./mlflow.db"


@pytest.mark.parametrize("codec", ["pca", "pca_clip", "pixel"])
def test_each_codec_option_fits_the_quickstart_dit(codec: str, outputs: Path) -> None:
    """`model/codec=<option>` on the quickstart: the DiT reads the codec's channels, its position tables hold the
    codec's latent grid of a 16x16 clip of 8 frames, and a sample decodes to that clip's shape."""
    cfg = compose_config(["experiment=quickstart", f"model/codec={codec}"], outputs / codec)
    model = hydra.utils.instantiate(cfg.model, _convert_="object")
    channels, t, h, w = model.codec.latent_shape(8, 16, 16)
    net = cfg.model.net
    assert channels == net.in_channels
    grid = (t // net.patch[0], h // net.patch[1], w // net.patch[2])
    assert all(n <= m for n, m in zip(grid, (net.max_t, net.max_h, net.max_w))), grid
    if hasattr(model.codec, "fit"):
        clips = torch.rand(4, 3, 8, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
        model.codec.fit([clips], max_refine_steps=2)  # shapes only: a refined decode's fit kept short
    video = model.eval().generate({"text": ["A red circle bounces around."], "fps": 8.0}, 8, 16, 16, steps=1)
    assert video.shape == (1, 3, 8, 16, 16) and torch.isfinite(video).all()


def test_threads_are_split_between_the_processes_of_one_machine(outputs: Path) -> None:
    """The quickstart asks for 2 threads: 2 on one process, 1 each for 2 CPU processes on 2 cores, 2 each on 4
    cores; a GPU run keeps what it asks."""
    def threads(*overrides: str, cores: int) -> int:
        return threads_per_process(compose_config(["experiment=quickstart", *overrides], outputs / "job"), cores)

    assert threads(cores=2) == 2
    assert threads("strategy=fsdp", "trainer.devices=2", cores=2) == 1
    assert threads("strategy=fsdp", "trainer.devices=2", cores=4) == 2
    assert threads("trainer.devices=3", cores=2) == 1
    assert threads("trainer=gpu", "trainer.devices=2", cores=2) == 2


def test_the_quickstart_world_leaves_only_heading_and_phase_to_chance(outputs: Path) -> None:
    """conf/data/world/centred.yaml as the quickstart composes it: every object solid, upright, of radius 0.3 of
    the canvas, starting at the middle, every bounce at 0.7 canvases a second (t2v_tiny's world draws them)."""
    def objects(experiment: str) -> list:
        world = OmegaConf.to_container(compose_config([f"experiment={experiment}"], outputs / experiment).data.world)
        return [make_scene(WorldConfig(**world), "train", i)[0].scene for i in range(24)]

    headings = set()
    for scene in objects("quickstart"):
        (obj,) = scene.objects
        side = min(scene.height, scene.width)
        assert (obj.texture, obj.angle, obj.spin, obj.radius) == ("solid", 0.0, 0.0, 0.3 * side)
        if obj.motion == "bounce":
            assert math.hypot(*obj.velocity) == pytest.approx(0.7 * side)
            headings.add(round(math.atan2(obj.velocity[1], obj.velocity[0]), 3))
        if obj.motion in ("bounce", "still"):
            assert obj.position == pytest.approx((scene.width / 2, scene.height / 2))
    assert len(headings) > 3
    assert len({scene.objects[0].radius for scene in objects("t2v_tiny")}) > 3


def test_quickstart_precision_follows_the_cpu(outputs: Path) -> None:
    """`${cpu_precision:}`: the quickstart trains in bf16-mixed where bfloat16 matmuls beat float32 on this CPU (a
    measurement here, not the flag the resolver reads) and in 32-true elsewhere."""
    import time

    from lightning_modules.optimizers import fast_bfloat16

    precision = compose_config(["experiment=quickstart"], outputs).trainer.precision
    assert precision == ("bf16-mixed" if fast_bfloat16(torch.device("cpu")) else "32-true")
    a = torch.randn(512, 512)

    def seconds(dtype: torch.dtype) -> float:
        x = a.to(dtype)
        x @ x
        start = time.perf_counter()
        for _ in range(20):
            x @ x
        return time.perf_counter() - start

    if precision == "bf16-mixed":  # where it says fast, bfloat16 is not the ~30x slower emulation
        assert seconds(torch.bfloat16) < 3 * seconds(torch.float32)
