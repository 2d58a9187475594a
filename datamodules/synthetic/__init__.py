"""The shapes world: a procedural media dataset with exact ground truth (see `generate` for the kinds)."""

from datamodules.synthetic.generate import KINDS, SPLITS, WorldConfig, world_sample, world_samples

__all__ = ["KINDS", "SPLITS", "WorldConfig", "world_sample", "world_samples"]
