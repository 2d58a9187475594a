"""Movie Gen Audio (#19, items 3-4): long audio by extension (segment by segment, each continuing the previous
one's frames), a given audio kept in the output, and `task=sample` with `model.sample.context_audio` (extend or
infill) from the command line."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import torch

from datamodules.media import decode_audio, probe_audio, probe_video, write_audio, write_video
from datamodules.synthetic.sound import sonify
from experiments.compose import compose_config
from lightning_modules.audio_generation import AudioSampleConfig, context_mask
from lightning_modules.generative import multidiffusion

pytestmark = pytest.mark.usefixtures("one_thread")
HOP, RATE = 160, 8000  # audio_v2a's codec: 8 kHz, 50 latent frames a second
TINY = ["experiment=audio_v2a", "model.codec.checkpoint=null", "model.codec.net.width=4", "model.net.depth=1",
        "model.net.dim=32", "model.net.ffn_dim=64", "model.net.heads=2", "model.sampler.steps=2"]


def tiny_model(outputs: Path, *extra: str):
    """The audio DiT at test size, its weights (and the conditioners' zero-initialised projections) moved away
    from zero so that every condition, the context included, changes the output."""
    model = hydra.utils.instantiate(compose_config([*TINY, *extra], outputs / "job").model, _convert_="object").eval()
    torch.manual_seed(1)
    for p in [*model.net.parameters(), *model.conditioners.parameters()]:
        p.data.normal_(0, 0.1)
    return model


def clip_batch(seconds: float) -> dict:
    frames = round(seconds * 16)
    return {"text": ["Tones of the circle once."], "video": torch.rand(1, 3, frames, 16, 16) * 2 - 1,
            "fps": torch.tensor([16.0])}


def test_context_mask_against_hand_counts() -> None:
    # 2000 samples -> 13 frames of 160; the first 1000 samples given: frames 0..5 end by 960 <= 1000, frame 6 at 1120
    assert context_mask(1000, 2000, HOP).tolist() == [1.0] * 6 + [0.0] * 7
    # a gap of samples [480, 800) meets frames 3 ([480, 640)) and 4 ([640, 800)), not 2 ([320, 480)) nor 5
    assert context_mask(1000, 2000, HOP, gap=(480, 800)).tolist() == [1, 1, 1, 0, 0, 1] + [0] * 7
    assert context_mask(1000, 2000, HOP, gap=(479, 801)).tolist() == [1, 1, 0, 0, 0, 0] + [0] * 7
    assert context_mask(4800, 4800, HOP).sum() == 30


def test_a_span_is_one_of_independent_windows(outputs: Path) -> None:
    """Windows that do not overlap are independent, so MultiDiffusion over windows of 10 with overlap 0 is three
    separate solves: its frames [10, 20) are generate(span=(10, 20)) of the same clip and seed."""
    model = tiny_model(outputs, "model.sampler.window=10", "model.sampler.overlap=0")
    batch, samples = clip_batch(0.6), 30 * HOP
    fused = model.generate(batch, samples, seed=3, return_latent=True)
    middle = model.generate(batch, samples, seed=3, span=(10, 20), return_latent=True)
    assert middle.shape == (1, 8, 10, 1, 1)
    assert torch.allclose(middle, fused[:, :, 10:20], atol=1e-5)
    assert not torch.allclose(middle, fused[:, :, :10], atol=1e-3)  # not any window: the conditions are cut to it
    with pytest.raises(ValueError, match="return_latent=True"):
        model.generate(batch, samples, span=(10, 20))
    with pytest.raises(ValueError, match="must lie in the clip's 30 latent frames"):
        model.generate(batch, samples, span=(25, 35), return_latent=True)


def test_extension_keeps_the_given_prefix_and_continues_each_segment(outputs: Path) -> None:
    """A clip 3x the window (30 latent frames, window 10, overlap 4: spans (0,10) (6,16) (12,22) (18,28) (20,30),
    the last aligned to the end): the given 7 frames come back exactly; every segment's new frames are what the
    model makes from all frames before it as context (recomputed span by span); the joined audio has the clip's
    length. A context mask one frame short gives another segment (the check would see an off-by-one)."""
    model = tiny_model(outputs, "model.sampler.window=10", "model.sampler.overlap=4", "model.long_audio=extend")
    batch, samples = clip_batch(0.6), 30 * HOP
    given = torch.randn(1, 8, 30, 1, 1, generator=torch.Generator().manual_seed(5))
    known = torch.zeros(1, 30)
    known[:, :7] = 1.0
    request = {**batch, "context_latent": given, "context_mask": known}
    latent = model.generate(request, samples, seed=2, return_latent=True)
    assert latent.shape == (1, 8, 30, 1, 1)
    assert torch.equal(latent[:, :, :7], given[:, :, :7])
    spans = multidiffusion.window_spans(30, 10, 4)
    assert spans == [(0, 10), (6, 16), (12, 22), (18, 28), (20, 30)]
    done = 7
    for start, end in spans:
        mask = (torch.arange(30) < done).float()[None]
        segment = model.generate({**batch, "context_latent": latent, "context_mask": mask}, samples, seed=2,
                                 span=(start, end), return_latent=True)
        assert torch.allclose(segment[:, :, done - start :], latent[:, :, done:end], atol=1e-5), (start, end)
        done = end
    short = (torch.arange(30) < 11).float()[None]  # segment (6, 16) with frame 11 wrongly left out of its context
    other = model.generate({**batch, "context_latent": latent, "context_mask": short}, samples, seed=2,
                           span=(6, 16), return_latent=True)
    assert not torch.allclose(other[:, :, 4:], latent[:, :, 10:16], atol=1e-3)
    audio = model.generate(request, samples, seed=2)
    assert audio.shape == (1, 1, samples) and torch.allclose(audio, model.from_latent(latent, samples), atol=1e-6)
    model.long_audio = "windows"  # fused windows keep the given frames too, and make another clip
    fused = model.generate(request, samples, seed=2, return_latent=True)
    assert torch.equal(fused[:, :, :7], given[:, :, :7]) and not torch.allclose(fused, latent, atol=1e-3)


def test_given_audio_bad_input_gets_a_one_line_error(outputs: Path, tmp_path: Path) -> None:
    model = tiny_model(outputs)
    tone = torch.from_numpy(sonify([{"time": 0.2, "objects": [0]}], {0: "circle"}, 1.0, RATE))
    write_audio(tmp_path / "low.wav", tone[:, ::2], RATE // 2)  # 4 kHz
    write_audio(tmp_path / "one_second.wav", tone, RATE)
    write_video(tmp_path / "half.mp4", torch.rand(3, 8, 16, 16) * 2 - 1, fps=16.0)  # 0.5 s
    cases = {
        "below the codec's 8000 Hz": dict(context_audio=str(tmp_path / "low.wav")),
        "longer than the input video half": dict(context_audio=str(tmp_path / "one_second.wav"),
                                                 inputs=str(tmp_path / "half.mp4")),
        r"must lie inside model.sample.context_audio=.*\(1.00 s\)": dict(
            context_audio=str(tmp_path / "one_second.wav"), context_mode="infill", context_span=[0.5, 1.5]),
    }
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Tones of the circle once.\n")
    for message, fields in cases.items():
        model.sample_cfg = AudioSampleConfig(**{"prompts": str(prompts), **fields})
        with pytest.raises(ValueError, match=message) as error:
            model.sample_requests()
        assert "\n" not in str(error.value)
    write_video(tmp_path / "second.mp4", torch.rand(3, 16, 16, 16) * 2 - 1, fps=16.0)  # 1 s, as long as the audio
    model.sample_cfg = AudioSampleConfig(context_audio=str(tmp_path / "one_second.wav"), inputs=str(tmp_path / "second.mp4"))
    with pytest.raises(ValueError, match="nothing left to extend"):
        model.sample_requests()
    model.sample_cfg = AudioSampleConfig(context_audio=str(tmp_path / "none.wav"), prompts=str(prompts))
    with pytest.raises(FileNotFoundError, match="context_audio=.*none.wav: no such file"):
        model.sample_requests()
    with pytest.raises(ValueError, match="context_mode='sideways'"):
        AudioSampleConfig(context_mode="sideways")
    with pytest.raises(ValueError, match="needs model.sample.context_span"):
        AudioSampleConfig(context_audio="a.wav", context_mode="infill")
    with pytest.raises(ValueError, match=r"start_s < end_s"):
        AudioSampleConfig(context_mode="infill", context_span=[1.0, 0.5])
    with pytest.raises(Exception, match="model.long_audio='beams'; choose one of"):  # hydra wraps the ValueError
        tiny_model(outputs, "model.long_audio=beams")


def test_sample_task_extends_and_infills_a_given_wav(outputs: Path, tmp_path: Path) -> None:
    """`python experiments/run.py experiment=audio_v2a task=sample model.sample.context_audio=<wav>` (in process):
    a 1 s wav at 16 kHz (resampled to the codec's 8 kHz) continued for text_duration = 0.5 s and to an input
    video's 1.5 s; then in a model, infill of [0.3, 0.6] s keeps the frames outside the gap exactly."""
    from experiments.runner import run

    tone = torch.from_numpy(sonify([{"time": 0.2, "objects": [0]}, {"time": 0.7, "objects": [0]}], {0: "star"},
                                   1.0, 16000))
    write_audio(tmp_path / "given.wav", tone, 16000)
    write_video(tmp_path / "in" / "bounce.mp4", torch.rand(3, 24, 32, 32) * 2 - 1, fps=16.0)  # 1.5 s
    (tmp_path / "prompts.txt").write_text("Tones of the star twice.\n")
    run(compose_config([*TINY, "task=sample", "model.text_duration=0.5", "trainer.accelerator=cpu",
                        "trainer.enable_progress_bar=false", f"model.sample.context_audio={tmp_path / 'given.wav'}",
                        f"model.sample.prompts={tmp_path / 'prompts.txt'}", f"model.sample.inputs={tmp_path / 'in'}",
                        f"model.sample.output_dir={tmp_path / 'samples'}"], outputs / "job"))
    wav, mp4 = tmp_path / "samples" / "000_tones_of_the_star_twice.wav", tmp_path / "samples" / "001_bounce.mp4"
    assert probe_audio(wav).sample_rate == RATE and probe_audio(wav).duration == pytest.approx(1.5, abs=1e-3)
    assert probe_video(mp4).has_audio and probe_audio(mp4).duration == pytest.approx(1.5, abs=0.05)

    model = tiny_model(outputs)
    model.sample_cfg = AudioSampleConfig(prompts=str(tmp_path / "prompts.txt"), context_audio=str(tmp_path / "given.wav"),
                                         context_mode="infill", context_span=[0.3, 0.6])
    request = model.sample_requests()[0]
    assert request["samples"] == RATE and request["context_mask"].sum() == 50 - 15  # frames 15..29 meet [0.3, 0.6) s
    given = model.encode(decode_audio(tmp_path / "given.wav", RATE, channels=1)[0][None])
    latent = model.generate(request, request["samples"], seed=0, return_latent=True)
    keep = request["context_mask"][0].bool()
    assert torch.equal(latent[:, :, keep], given[:, :, keep]) and not torch.allclose(latent, given, atol=1e-3)
