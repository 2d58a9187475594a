"""Compose the project's Hydra config in-process, as `experiments/run.py` would, for fast tests."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

import experiments.run  # noqa: F401  (registers the config resolvers)
from tests.helpers import ROOT

EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))


def compose_config(overrides: list[str], output_dir: Path) -> DictConfig:
    """The job config for `overrides`, with HydraConfig set and the job's output folder at `output_dir`."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.runtime.cwd = str(ROOT)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    job = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    del job["hydra"]
    OmegaConf.set_struct(job, True)
    return job
