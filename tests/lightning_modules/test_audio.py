"""Movie Gen Audio (#19): the DAC-VAE, its measures, the conditioners (video features per latent frame, masked audio
context), the audio DiT on the generation core, windows over time, the muxed mp4 of task=sample."""

from __future__ import annotations

import json
import math
from pathlib import Path

import hydra
import lightning as L
import numpy as np
import pytest
import torch
from einops import rearrange

from datamodules.media import decode_audio, encode_audio, probe_audio, probe_video, write_video
from datamodules.synthetic import WorldConfig, world_sample
from datamodules.synthetic.sound import PITCH, sonify
from experiments.compose import compose_config
from lightning_modules.conditioning.audio import (
    AudioContext,
    VideoFrameFeatures,
    draw_masks,
    frames_on_screen,
    video_frame_features,
)
from lightning_modules.evaluation.audio import (
    SyncCounter,
    SyncEvaluator,
    caption_shapes,
    detect_onsets,
    event_times,
    match_counts,
    multi_resolution_stft_distance,
    precision_recall_f1,
    si_sdr,
    spectrogram_image,
    tone_shapes,
)
from lightning_modules.generative import multidiffusion
from lightning_modules.nn.audio_ae import AudioCodec, AudioVAE, ResidualUnit
from lightning_modules.nn.dit import DiT, count_parameters

pytestmark = pytest.mark.usefixtures("one_thread")
WORLD = WorldConfig()  # the default world the experiments read (scenes rendered on demand, not written)


# -- the autoencoder ---------------------------------------------------------------------------------------------------
def test_autoencoder_shapes_and_frame_rate() -> None:
    torch.manual_seed(0)
    net = AudioVAE(width=4, strides=(4, 5, 8), latent_channels=8)
    assert net.hop == 160
    audio = torch.rand(2, 1, 8000) * 2 - 1
    posterior = net.encode(audio)
    assert posterior.mean.shape == (2, 8, 50)  # 8 kHz / 160 = 50 latent frames a second
    assert net.decode(posterior.mode(), 8000).shape == (2, 1, 8000)
    odd = net.encode(audio[..., :8001 - 2])  # 7998 samples: padded up to 50 frames, cut back on decode
    assert odd.mean.shape[-1] == 50 and net.decode(odd.mean, 7998).shape[-1] == 7998
    assert net.encode(audio[..., :161]).mean.shape[-1] == 2
    codec = AudioCodec(net, sample_rate=8000)
    assert codec.frame_rate == 50.0 and codec.latent_shape(16000) == (8, 100, 1, 1)
    assert codec.encode(audio).shape == (2, 8, 50, 1, 1)
    assert torch.equal(codec.decode(codec.encode(audio), 8000), net.decode(posterior.mode(), 8000))
    unit = next(m for m in net.modules() if isinstance(m, ResidualUnit))
    x = torch.randn(1, unit.block[1].in_channels, 40)
    assert torch.equal(unit(x), x)  # residual units start as the identity
    wide = AudioVAE(width=32, strides=(4, 5, 8))  # variance-preserving init: std(w) = 1 / sqrt(C_in * k)
    conv = wide.encoder[5]  # after the first conv, 3 residual units and a Snake: the stride-4 conv, C_in 32, k 8
    assert isinstance(conv, torch.nn.Conv1d) and conv.stride == (4,)
    assert conv.weight.std().item() == pytest.approx((32 * 8) ** -0.5, rel=0.05)
    with pytest.raises(ValueError, match=r"audio \[B, 1, S\]"):
        net.encode(audio[:, 0])
    with pytest.raises(FileNotFoundError, match="experiment=audio_ae"):
        AudioCodec(net, checkpoint="/nonexistent/audio_ae")


def test_stft_distance_and_si_sdr_against_closed_forms() -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 1, 4000, generator=g) * 0.3
    assert multi_resolution_stft_distance(s, s).item() == pytest.approx(0.0, abs=1e-6)
    # |STFT(2s)| = 2|STFT(s)|: spectral convergence 1, log-magnitude difference log 2 (away from empty bins)
    assert multi_resolution_stft_distance(2 * s, s).item() == pytest.approx(1 + math.log(2), abs=0.01)
    # SI-SDR of s + n with n orthogonal to s and ||n||^2 = ||s||^2 / 100: 20 dB, whatever the estimate's scale
    s = s - s.mean(-1, keepdim=True)
    n = torch.randn(2, 1, 4000, generator=g)
    n = n - n.mean(-1, keepdim=True)
    n = n - (n * s).sum(-1, keepdim=True) / (s * s).sum(-1, keepdim=True) * s
    n = n * ((s * s).sum(-1, keepdim=True) / (n * n).sum(-1, keepdim=True) / 100).sqrt()
    assert si_sdr(s + n, s).flatten().tolist() == pytest.approx([20.0, 20.0], abs=1e-3)
    assert si_sdr(3 * (s + n), s).flatten().tolist() == pytest.approx([20.0, 20.0], abs=1e-3)
    assert si_sdr(s + 10 * n, s).flatten().tolist() == pytest.approx([0.0, 0.0], abs=1e-3)


# -- synchronisation and relevance measures ------------------------------------------------------------------------------
def test_onsets_of_the_worlds_soundtracks_match_its_events() -> None:
    """The ceiling of the sync metric: the world's real wavs (through PyAV, at 8 kHz) against the json's events."""
    counter, shifted, relevance = SyncCounter(0.1), SyncCounter(0.1), []
    for index in range(8):
        sample = world_sample(WORLD, "scenes", "val", index)
        meta = json.loads(json.dumps(sample["json"]))
        audio, rate = decode_audio(sample["wav"], 8000)
        duration = audio.shape[-1] / rate
        onsets = detect_onsets(audio, rate)
        counter.add(onsets, event_times(meta, duration))
        shifted.add(onsets, [t + 0.25 for t in event_times(meta, duration)])  # a quarter second late
        if onsets:
            relevance.append(tone_shapes(audio, rate, onsets) <= caption_shapes(meta["audio_caption"]))
    assert counter.events >= 6
    assert counter.scores()["f1"] > 0.95
    assert shifted.scores()["f1"] < 0.3  # only where another event happens to sit a quarter second later
    assert all(relevance) and relevance


def test_matching_is_one_to_one_within_the_tolerance() -> None:
    assert match_counts([1.0, 1.02], [1.01], 0.1) == 1  # two onsets, one event
    assert match_counts([1.0], [1.0, 1.05], 0.1) == 1
    assert match_counts([0.5, 1.5], [0.55, 1.45], 0.06) == 2
    assert match_counts([0.5], [0.61], 0.1) == 0
    # closest pairs first: 0.9 -> 1.0 would steal 1.0 from 1.01 under first-come matching
    assert match_counts([0.9, 1.01], [1.0, 0.85], 0.1) == 2
    assert precision_recall_f1(3, 4, 6) == pytest.approx({"precision": 0.75, "recall": 0.5, "f1": 0.6})
    assert precision_recall_f1(0, 0, 0)["f1"] == 1.0 and precision_recall_f1(0, 2, 0)["f1"] == 0.0
    assert event_times({"events": [{"time": 0.5}, {"time": 0.5}, {"time": 1.7}, {"time": 2.5}]}, 2.0) == [0.5, 1.7]
    assert event_times({"events": [{"time": 0.5}, {"time": 1.7}]}, 1.0, start=0.4) == [pytest.approx(0.1)]


def test_sync_evaluator_reports_generated_real_and_shuffled() -> None:
    rate, events = 8000, [[0.2, 1.1], [0.6], [1.5, 0.4]]
    metas = [{"events": [{"time": t, "objects": [0]} for t in clip]} for clip in events]
    real = torch.stack([torch.from_numpy(sonify(m["events"], {0: "star"}, 2.0, rate)) for m in metas])
    batch = {"audio": real, "meta": metas, "sample_rate": rate, "text": ["Tones of the star twice."] * 3}
    evaluator = SyncEvaluator(tolerance=0.1)
    evaluator.update(real.clone(), batch, {})  # a perfect generator
    scores = evaluator.compute()
    assert scores["sync_f1"] == pytest.approx(1.0) and scores["sync_f1_real"] == pytest.approx(1.0)
    assert scores["sync_f1_shuffled"] < 0.5 and scores["pitch_relevance"] == pytest.approx(1.0)
    # the same tracks as 1.5 s crops starting 0.5 s into scenes whose events are 0.5 s later: still perfect
    late = [{"events": [{"time": t + 0.5, "objects": [0]} for t in clip]} for clip in events]
    evaluator.start(None, None)
    evaluator.update(real[..., : int(1.5 * rate)].clone(), {**batch, "audio": real[..., : int(1.5 * rate)],
                                                            "meta": late, "start": torch.full((3,), 0.5)}, {})
    assert evaluator.compute()["sync_f1"] == pytest.approx(1.0)
    evaluator.start(None, None)
    evaluator.update(torch.zeros_like(real), batch, {})  # silence
    assert evaluator.compute()["sync_recall"] == 0.0
    assert PITCH["star"] == 880.0 and caption_shapes("Tones of the star and the circle.") == {"star", "circle"}
    image = spectrogram_image(real)
    assert image.shape == (3, 3 * 129, real.shape[-1] // 64 + 1) and image.min() >= -1 and image.max() <= 1


# -- conditioners ------------------------------------------------------------------------------------------------------
def test_video_features_are_aligned_to_the_audio_frames() -> None:
    """Frame k of a clip at 8 fps is on screen during [k/8, (k+1)/8): audio latent frames (50 Hz) whose centres
    (j + 1/2)/50 fall there see it, j = 19..24 for k = 3."""
    video = -torch.ones(1, 3, 8, 16, 16)
    video[:, :, 3] = 1.0
    conditioner = VideoFrameFeatures(dim=8, latent_rate=50.0, grid=2)
    raw = conditioner.inputs({"video": video, "fps": torch.tensor([8.0]), "text": [""]}, None, (8, 50, 1, 1), True)
    assert raw.shape == (1, 50, 24)
    bright = (raw[0, :, :12].mean(-1) > 0).nonzero().flatten().tolist()
    assert bright == list(range(19, 25))
    change = raw[0, :, 12:].mean(-1)  # the frame's change: +2 when frame 3 appears, -2 when frame 4 replaces it
    assert change[19].item() == pytest.approx(2.0) and change[25].item() == pytest.approx(-2.0)
    assert frames_on_screen(8, 8.0, 50, 50.0).tolist() == [min(7, math.floor((j + 0.5) / 50 * 8)) for j in range(50)]
    text_only = conditioner.inputs({"text": ["a"]}, None, (8, 50, 1, 1), True)
    assert text_only.shape == (1, 50, 24) and not text_only.any()
    assert not conditioner(raw).any()  # the projection starts at zero
    with pytest.raises(ValueError, match="frame rates"):
        conditioner.inputs({"video": video, "text": [""]}, None, (8, 50, 1, 1), True)


def test_video_features_acceleration_is_the_second_difference() -> None:
    """A dot moving right one cell a frame, turned back after frame 3: the extra features are the second
    difference p_{k+1} - 2 p_k + p_{k-1} written out (0 at both ends), the first 6g² are the plain features."""
    columns = [0, 1, 2, 3, 2, 1]
    video = -torch.ones(1, 3, len(columns), 4, 4)
    for k, x in enumerate(columns):
        video[:, :, k, 1, x] = 1.0
    plain, acc = video_frame_features(video, 4), video_frame_features(video, 4, acceleration=True)
    assert plain.shape == (1, 6, 96) and acc.shape == (1, 6, 144)
    assert torch.equal(acc[..., :96], plain)
    p = video[0, 0, :, 1]  # one row of one channel: [T, 4] (pooling to 4x4 is the identity)
    expected = torch.zeros_like(p)
    for k in range(1, len(columns) - 1):
        expected[k] = p[k + 1] - 2 * p[k] + p[k - 1]
    second = rearrange(acc[0, :, 96:], "t (c h w) -> t c h w", c=3, h=4)[:, 0, 1]
    assert torch.equal(second, expected)
    assert not second[0].any() and not second[-1].any() and second[3, 2] == 4.0  # the turn: 2·(2 e_2 − 2 e_3)
    assert VideoFrameFeatures(dim=8, latent_rate=50.0, grid=4, acceleration=True).projection.in_features == 144


def test_audio_context_masks_and_channels() -> None:
    g = torch.Generator().manual_seed(0)
    for kind in ("prefix", "suffix", "middle", "none"):
        masks = draw_masks(64, 20, {kind: 1.0}, 0.2, 0.8, generator=g)
        known = masks.sum(1)
        if kind == "none":
            assert not masks.any()
            continue
        first_known, last_known = masks[:, 0], masks[:, -1]
        if kind == "prefix":
            assert first_known.all() and not last_known.any() and torch.equal(masks, masks.cummin(1).values)
        if kind == "suffix":
            assert last_known.all() and not first_known.any()
        if kind == "middle":
            assert ((20 - known) >= 4).all() and ((20 - known) <= 16).all()
    context = AudioContext(latent_channels=2, weights={"prefix": 1.0})
    audio = torch.randn(3, 1, 100)
    encode = lambda a: a.view(3, 1, 10, 10).mean(-1)[..., None, None].expand(-1, 2, -1, 1, 1)  # noqa: E731
    raw = context.inputs({"audio": audio, "text": ["a"] * 3}, encode, (2, 10, 1, 1), train=True)
    m = raw[:, 2:]
    assert raw.shape == (3, 3, 10, 1, 1) and torch.equal(raw[:, :2], encode(audio) * m) and m[:, :, 0].all()
    assert not context.inputs({"text": ["a"] * 3}, encode, (2, 10, 1, 1), train=False).any()
    with pytest.raises(ValueError, match="kinds of"):
        AudioContext(2, weights={"sideways": 1.0})


# -- the audio DiT on the generation core ------------------------------------------------------------------------------
def audio_model(outputs: Path, *extra: str):
    overrides = ["experiment=audio_v2a", "model.codec.checkpoint=null", "model.codec.net.width=4", "model.net.depth=1",
                 "model.net.dim=32", "model.net.ffn_dim=64", "model.net.heads=2", "model.sampler.steps=2", *extra]
    return hydra.utils.instantiate(compose_config(overrides, outputs / "job").model, _convert_="object")


def test_windows_of_triangular_weights_sum_to_one_and_one_window_is_the_single_pass(outputs: Path) -> None:
    x = torch.randn(1, 4, 150, 1, 1)
    for weighting in ("uniform", "triangular"):  # weights normalised: the identity model gives back x
        fused = multidiffusion.fuse_windows(lambda piece, span: piece, x, 50, 25, dim=2, weighting=weighting)
        assert torch.allclose(fused, x, atol=1e-6)
    model = audio_model(outputs).eval()
    torch.manual_seed(1)
    for p in model.net.parameters():  # away from the zero init, so the output depends on the conditions
        p.data.normal_(0, 0.1)
    batch = {"text": ["Tones of the circle once."], "video": torch.rand(1, 3, 16, 16, 16) * 2 - 1,
             "fps": torch.tensor([16.0])}
    single = model.generate(batch, 8000, 1, 1, return_latent=True)  # 50 latent frames, window 100
    model.sampler.window = None
    assert torch.allclose(model.generate(batch, 8000, 1, 1, return_latent=True), single, atol=1e-5)  # w / w rounding
    assert model.generate(batch, 8000, 1, 1).shape == (1, 1, 8000)


def test_muxed_mp4_has_a_video_and_an_audio_stream_of_its_duration(outputs: Path, tmp_path: Path) -> None:
    model = audio_model(outputs, f"model.sample.output_dir={tmp_path / 'samples'}",
                        f"model.sample.inputs={tmp_path / 'in'}")
    clip = torch.rand(3, 24, 32, 32) * 2 - 1  # 1.5 s at 16 fps
    write_video(tmp_path / "in" / "bounce.mp4", clip, fps=16.0)
    (tmp_path / "in" / "bounce.txt").write_text("Tones of the star once.")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Tones of the circle twice.\n")
    model.sample_cfg.prompts = str(prompts)
    trainer = L.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path, enable_progress_bar=False)
    written = model.sample_to_files(trainer)
    mp4 = next(p for p in written if p.suffix == ".mp4")
    wav = next(p for p in written if p.suffix == ".wav")
    info = probe_video(mp4)
    assert info.has_audio and info.num_frames == 24 and info.audio_rate == 8000
    assert probe_audio(mp4).duration == pytest.approx(1.5, abs=0.05)
    assert probe_audio(wav).duration == pytest.approx(2.0, abs=1e-3)  # text_duration
    assert (tmp_path / "samples" / "001_bounce.txt").read_text().strip() == "Tones of the star once."
    with pytest.raises(ValueError, match="sample_rate"):
        model.to_latent({"audio": torch.zeros(1, 1, 800), "sample_rate": 16000})


def test_paper_size_audio_dit_on_the_meta_device() -> None:
    """36 layers, width 4608, FFN 18432 (§6): per block 8d² (self- and cross-attention) + 3·d·f (SwiGLU)."""
    with torch.device("meta"):
        net = DiT(in_channels=128, dim=4608, depth=36, heads=36, ffn_dim=18432, patch=(1, 1, 1), max_t=750,
                  max_h=1, max_w=1, cond_channels=129)
    block = sum(count_parameters(b) for b in net.blocks)
    assert block == 36 * (8 * 4608**2 + 3 * 4608 * 18432 + 9 * 4608)  # + 3 norms and the 6-row modulation table
    assert 15.2e9 < block < 15.4e9 and net.num_tokens((128, 750, 1, 1)) == 750


def test_wav_bytes_round_trip_through_the_codec_interface() -> None:
    audio = torch.from_numpy(sonify([{"time": 0.1, "objects": [0]}], {0: "circle"}, 0.5, 8000))
    decoded, rate = decode_audio(encode_audio(audio, 8000), 8000)
    assert rate == 8000 and decoded.shape == (1, 4000)
    assert np.abs(decoded.numpy() - audio.numpy()).max() < 1e-3


# -- short trainings (slow) ------------------------------------------------------------------------------------------------
def world_audio(split: str, count: int, seconds: float = 1.0) -> torch.Tensor:
    """The first `count` soundtracks of the world's split at 8 kHz, cut to `seconds` ([count, 1, S])."""
    clips = [decode_audio(world_sample(WORLD, "scenes", split, i)["wav"], 8000, start=0.0, duration=seconds)[0]
             for i in range(count)]
    return torch.stack(clips)


@pytest.mark.slow
def test_short_training_lowers_the_autoencoder_loss(outputs: Path) -> None:
    cfg = compose_config(["experiment=audio_ae", "model.net.width=4"], outputs / "job")
    module = hydra.utils.instantiate(cfg.model, _convert_="object")
    train, held_out = world_audio("train", 16), world_audio("val", 8)
    before = module.losses(held_out, sample=False)["loss"].item()
    optimizer = torch.optim.Adam(module.net.parameters(), lr=2e-3)
    torch.manual_seed(0)
    for _ in range(40):
        batch = train[torch.randint(len(train), (8,))]
        loss = module.losses(batch, sample=True)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = module.losses(held_out, sample=False)["loss"].item()
    assert after < 0.8 * before


@pytest.mark.slow
def test_short_training_lowers_the_audio_dit_loss(outputs: Path) -> None:
    from tests.helpers import fixed_loss

    module = audio_model(outputs)
    audio = world_audio("train", 8)
    batch = {"audio": audio, "sample_rate": 8000, "text": ["Tones of the circle once."] * 8,
             "video": torch.rand(8, 3, 16, 16, 16) * 2 - 1, "fps": torch.full((8,), 16.0)}
    before = fixed_loss(module, batch, times=8)
    optimizer = torch.optim.Adam(module.parameters(), lr=2e-3)
    torch.manual_seed(0)
    for _ in range(40):
        loss = module.loss(batch, train=True)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert fixed_loss(module, batch, times=8) < 0.9 * before


@pytest.mark.slow
def test_autoencoder_trains_on_a_users_wav_and_flac_shards(tmp_path: Path) -> None:
    """A folder of a user's wav and flac files (16 kHz, with captions) → shards (make_shards' folder mode) →
    `experiment=audio_ae data.shards=...` trains, reads every file and writes its checkpoint."""
    from datamodules.media import encode_audio
    from datamodules.write_shards import folder_to_shards
    from experiments.runner import run

    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 4)):
        folder = tmp_path / "media" / split
        folder.mkdir(parents=True)
        for i in range(count):
            events = [{"time": float(t), "objects": [0]} for t in sorted(rng.uniform(0, 0.9, 2))]
            audio = torch.from_numpy(sonify(events, {0: "circle"}, 1.0, 16000))
            ext = "flac" if i % 2 else "wav"
            (folder / f"tone{i}.{ext}").write_bytes(encode_audio(audio, 16000, ext))
            (folder / f"tone{i}.txt").write_text("Tones of the circle twice.")
        report = folder_to_shards(folder, tmp_path / "shards" / split, progress=False)
        assert report.index["num_samples"] == count and not report.skipped
    cfg = compose_config(["experiment=audio_ae", f"data.shards={tmp_path}/shards/train",
                          f"data.val_shards={tmp_path}/shards/val", "trainer.max_steps=4", "data.num_workers=0",
                          "trainer.enable_progress_bar=false", f"paths.log_dir={tmp_path}/out"], tmp_path / "job")
    run(cfg)
    assert (tmp_path / "job" / "checkpoints" / "last.ckpt").is_file()
