"""Evaluators named in a config (`model.evaluators`), plain code apart from the generation core."""

from lightning_modules.evaluation.base import Evaluator
from lightning_modules.evaluation.fidelity import Fidelity, psnr, ssim
from lightning_modules.evaluation.samples import SampleWriter
from lightning_modules.evaluation.world_measures import WorldMeasures

__all__ = ["Evaluator", "Fidelity", "psnr", "ssim", "SampleWriter", "WorldMeasures"]
