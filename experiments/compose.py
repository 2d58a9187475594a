"""Compose the project's Hydra config in-process, as `experiments/run.py` would: for tests, benchmarks and
notebooks that call `experiments.runner.run(cfg)` without a command line."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from experiments.run import CONFIG_DIR, list_experiments, register_resolvers

EXPERIMENTS = list_experiments()


def compose_config(overrides: list[str], output_dir: Path) -> DictConfig:
    """The job config for `overrides`, with HydraConfig set and the job's output folder at `output_dir`."""
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.runtime.cwd = str(CONFIG_DIR.parent)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    job = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    del job["hydra"]
    OmegaConf.set_struct(job, True)
    return job
