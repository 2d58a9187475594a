"""AVID's task=inpaint (lightning_modules/inpainting.py): the paste keeps the source outside the mask exactly,
each metric against a clip built to show it, masks read from an image or a video, and the command line on a clip
three windows long from a briefly trained stage-2 model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from datamodules.media import decode_video, frames_to_video, write_image, write_video
from datamodules.synthetic.world import BACKGROUND_COLOURS, OBJECT_COLOURS
from lightning_modules.inpainting import PRESETS, composite, inpainting_metrics, prompt_colour, read_mask
from tests.helpers import run_cli


def test_the_paste_keeps_the_source_outside_the_mask_exactly() -> None:
    source, generated = torch.rand(1, 3, 5, 8, 8) * 2 - 1, torch.rand(1, 3, 5, 8, 8) * 2 - 1
    mask = torch.zeros(1, 1, 5, 8, 8)
    mask[..., 2:6, 2:6] = 1.0
    out = composite(generated, source, mask)
    outside = mask.expand_as(source) == 0
    assert torch.equal(out[outside], source[outside]) and torch.equal(out[~outside], generated[~outside])
    metrics = inpainting_metrics(generated, source, mask, [])
    assert metrics["background_error"] == pytest.approx(float((generated - source).abs()[outside].mean()), rel=1e-6)


def test_seam_jump_and_colour_drift_see_what_they_measure() -> None:
    frames, mask = 12, torch.zeros(1, 1, 12, 8, 8)
    mask[..., 2:6, 2:6] = 1.0
    source = torch.zeros(1, 3, frames, 8, 8)
    ramp = torch.linspace(-0.5, 0.5, frames).view(1, 1, frames, 1, 1).expand(1, 3, frames, 8, 8).clone()
    smooth = inpainting_metrics(ramp, source, mask, [4, 8])
    assert smooth["seam_jump"] == pytest.approx(1.0, abs=1e-4)  # the same change at every step
    assert smooth["colour_drift"] == pytest.approx(1.0, abs=1e-4)  # -0.5 -> 0.5
    jumpy = ramp.clone()
    jumpy[:, :, 8:] += 0.3  # a jump between frames 7 and 8: the second window's start
    step = 1.0 / (frames - 1)  # the seams are the steps into frames 4 and 8; only the second one jumps
    expected = (step + (step + 0.3)) / 2 / step
    assert inpainting_metrics(jumpy, source, mask, [4, 8])["seam_jump"] == pytest.approx(expected, rel=1e-4)
    still = inpainting_metrics(torch.zeros_like(ramp), source, mask, [4, 8])
    assert still["temporal_flicker"] == 0 and still["colour_drift"] == 0


def test_text_alignment_reads_the_prompts_colour_in_the_fill() -> None:
    """Frames whose hole is filled with the prompt's colour count, others do not; a prompt naming no colour of the
    world gets no text_alignment."""
    assert prompt_colour("A small Blue circle, on a red background.") == list(OBJECT_COLOURS).index("blue")
    assert prompt_colour("A shape moves.") is None
    as_video = lambda rgb: torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1, 1) / 127.5 - 1  # noqa: E731
    clip = as_video(BACKGROUND_COLOURS["teal"]).expand(1, 3, 4, 8, 8).clone()
    mask = torch.zeros(1, 1, 4, 8, 8)
    mask[..., 2:6, 2:6] = 1.0
    fill = clip.clone()
    inside = mask.expand_as(clip) > 0.5
    fill[inside] = as_video(OBJECT_COLOURS["red"]).expand(1, 3, 4, 8, 8)[inside]
    fill[:, :, 3][inside[:, :, 3]] = as_video(OBJECT_COLOURS["green"]).expand(1, 3, 1, 8, 8)[inside[:, :, 3:]]
    assert inpainting_metrics(fill, clip, mask, [], "A red square.")["text_alignment"] == pytest.approx(0.75)
    assert inpainting_metrics(fill, clip, mask, [], "A green square.")["text_alignment"] == pytest.approx(0.25)
    assert inpainting_metrics(clip, clip, mask, [], "A red square.")["text_alignment"] == 0.0  # background only
    assert "text_alignment" not in inpainting_metrics(fill, clip, mask, [], "A square.")


def test_a_mask_image_is_propagated_and_a_mask_video_resampled(tmp_path: Path) -> None:
    image = -torch.ones(3, 16, 16)
    image[:, :8] = 1.0  # top half white: fill
    mask = read_mask(write_image(tmp_path / "mask.png", image), 6, 8, 8)
    assert mask.shape == (1, 1, 6, 8, 8) and mask[..., :4, :].eq(1).all() and mask[..., 4:, :].eq(0).all()
    video = -torch.ones(3, 4, 16, 16)
    for f in range(4):
        video[:, f, :, 4 * f:4 * f + 4] = 1.0  # a white column moving right
    moving = read_mask(write_video(tmp_path / "mask.mp4", video, 4.0), 8, 16, 16)
    assert moving.shape == (1, 1, 8, 16, 16)
    assert moving[0, 0, 0, 8, 1] == 1 and moving[0, 0, -1, 8, 14] == 1 and moving[0, 0, -1, 8, 1] == 0


@pytest.mark.slow  # two runs of the runner (~1-2 minutes): python -m pytest -m slow
@pytest.mark.parametrize("preset", ["retexture", "uncrop"])
def test_inpaint_from_the_command_line_any_length(outputs: Path, tmp_path: Path, preset: str) -> None:
    small = ["data.world.scenes=[16,8]", "data.world.images=[16,8]", "data.world.stickers=[16,8]",
             f"data.data_dir={tmp_path / 'data'}"]
    run_cli("experiment=avid_structure", "model.init_from=null", "trainer.max_steps=2", "data.epoch_batches=2",
            "data.batch_size=4", "data.num_workers=0", "data.val_batches=1", "trainer.enable_progress_bar=false",
            *small, timeout=600)
    frames = 20  # 2.5 training windows: windows of 8 with overlap 4 start at 0, 4, 8, 12
    source = torch.zeros(3, frames, 16, 16)
    source[0] = torch.linspace(-1, 1, 16).view(1, 1, 16)  # a red ramp, left to right
    source[2, :, 4:12, 4:12] = 0.8  # a blue square
    write_video(tmp_path / "clip.mp4", source, 8.0)
    mask = -torch.ones(3, 16, 16)
    mask[:, 4:12, 4:12] = 1.0
    write_image(tmp_path / "mask.png", mask)
    out = tmp_path / "inpainted"
    result = run_cli("experiment=avid_structure", "task=inpaint", "ckpt_path=last", *small,
                     f"inpaint.source={tmp_path / 'clip.mp4'}", f"inpaint.mask={tmp_path / 'mask.png'}",
                     "inpaint.prompt=A yellow circle.", f"inpaint.preset={preset}", f"inpaint.output_dir={out}",
                     timeout=600)
    assert "20 frames in 4 windows" in result.stdout
    (video,) = out.glob("*.mp4")
    metrics = json.loads(video.with_suffix(".json").read_text())
    assert metrics["w_s"] == PRESETS[preset] and metrics["windows"] == 4 and "seam_jump" in metrics
    written = frames_to_video(torch.from_numpy(decode_video(video).frames))
    reference = frames_to_video(torch.from_numpy(decode_video(tmp_path / "clip.mp4").frames))
    assert written.shape == (3, frames, 16, 16)
    outside = torch.ones(16, 16, dtype=torch.bool)
    outside[3:13, 3:13] = False  # away from the mask's edge (the codec blurs it)
    assert (written - reference)[:, :, outside].abs().mean() < 0.05, "the source is kept outside the mask"
