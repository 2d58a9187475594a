"""The denoising-stages benchmark's clips: the codec's reconstruction, SDEdit from a start time, text-to-video."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import torch

from experiments.benchmarks.denoising_stages import stage_clips
from experiments.compose import compose_config


@pytest.fixture(scope="module")
def module(tmp_path_factory: pytest.TempPathFactory) -> torch.nn.Module:
    """The quickstart's model (untrained) on the exact pixel codec, with few solver steps."""
    cfg = compose_config(["experiment=quickstart", "model/codec=pixel", "model.sampler.steps=4"],
                         Path(tmp_path_factory.mktemp("stages")))
    return hydra.utils.instantiate(cfg.model, _convert_="object").eval()


def test_stages_run_from_the_codec_to_text_to_video(module: torch.nn.Module) -> None:
    torch.manual_seed(0)
    batch = {"video": torch.rand(2, 3, 8, 16, 16) * 2 - 1, "text": ["A red circle sits still.", "A blue star."],
             "fps": torch.tensor([8.0, 8.0])}
    assert torch.allclose(stage_clips(module, batch, None), batch["video"], atol=1e-5)  # the pixel codec is exact
    # from t0 close to 1 only a sliver of noise is left and the solver moves the clip by (1 - t0) x velocity
    late = stage_clips(module, batch, 0.999)
    assert (late - batch["video"]).abs().max() < 0.05
    early = stage_clips(module, batch, 0.5)
    assert (early - batch["video"]).abs().mean() > 10 * (late - batch["video"]).abs().mean()
    # from t0 = 0 it is the module's own text-to-video sample for the same seed
    sample = module.generate({"text": batch["text"], "fps": batch["fps"]}, 8, 16, 16, seed=0)
    assert torch.allclose(stage_clips(module, batch, 0.0), sample, atol=1e-5)
