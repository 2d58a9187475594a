"""The learned audio-video alignment and audio-text relevance judge of Movie Gen Audio (#19 item 5,
lightning_modules/evaluation/audio_alignment.py): InfoNCE against a hand computation, the front ends against
known signals, the trained judge separating real pairs from shuffled and time-shifted ones on a small world of
bouncing objects (the world's own simulator, renderer and sound), the evaluator's figures, and the cache."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.synthetic.captions import scene_caption
from datamodules.synthetic.generate import realise, sample_background, sample_object
from datamodules.synthetic.sound import PITCH, sonify, tone
from datamodules.synthetic.world import SceneSpec
from lightning_modules.evaluation.audio_alignment import (
    AlignmentConfig,
    AlignmentModel,
    AudioAlignmentEvaluator,
    aligned_video_features,
    audio_spectrum,
    fit_alignment,
    info_nce,
    read_clips,
)
from lightning_modules.evaluation.base import cached_network

pytestmark = pytest.mark.usefixtures("one_thread")
RATE, FPS, SIZE = 8000, 16.0, 16
CONFIG = AlignmentConfig(sample_rate=RATE, rate=25.0, grid=4, width=32, dim=16, steps=120, batch=32, lr=3e-3)


def test_info_nce_matches_a_hand_computation() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(3, 4, generator=g), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(3, 4, generator=g), dim=-1)
    scale = 7.0
    sim = [[scale * sum(x[i, k].item() * y[j, k].item() for k in range(4)) for j in range(3)] for i in range(3)]
    rows = [-sim[i][i] + math.log(sum(math.exp(sim[i][j]) for j in range(3))) for i in range(3)]
    cols = [-sim[j][j] + math.log(sum(math.exp(sim[i][j]) for i in range(3))) for j in range(3)]
    expected = 0.5 * (sum(rows) / 3 + sum(cols) / 3)
    assert info_nce(x, y, math.log(scale)).item() == pytest.approx(expected, rel=1e-5)
    # perfectly matched distinct pairs at a large scale: the loss goes to 0; swapped pairs cost a lot
    eye = torch.eye(3)
    assert info_nce(eye, eye, math.log(100.0)).item() < 1e-6
    assert info_nce(eye, eye[[1, 2, 0]], math.log(100.0)).item() > 50


def test_spectrum_and_video_features_keep_time() -> None:
    """A full-scale tone starting at 0.4 s: silent aligned frames read 0 and the tone's frames its pitch's bin near
    0 dB; a bright video frame k at 8 fps is on screen for aligned frames j with ⌊(j + ½)/25 · 8⌋ = k."""
    audio = torch.zeros(1, 1, RATE)
    start = int(0.4 * RATE)
    sound = torch.from_numpy(tone(PITCH["star"], RATE)) / 0.4  # amplitude 1
    audio[0, 0, start : start + len(sound)] = sound
    spectrum = audio_spectrum(audio, RATE, 25.0)  # hop 80 (10 ms), window 320: 161 bins of 25 Hz
    assert spectrum.shape == (1, 161, 100)
    assert spectrum[0, :, :35].max() == 0.0  # frames centred before 0.35 s: silence, the window does not reach
    loud = spectrum[0, :, 41]  # centred at 0.41 s: the tone's first 10 ms of 120, at its loudest
    assert loud.argmax().item() == round(PITCH["star"] / 25)
    assert loud.max().item() == pytest.approx(1.0, abs=0.1)  # a full-scale tone's peak ≈ 0 dB (decay: a bit under)
    video = -torch.ones(1, 3, 8, 8, 8)
    video[:, :, 3] = 1.0
    features = aligned_video_features(video, torch.tensor([8.0]), 25, 25.0, grid=2)
    assert features.shape == (1, 24, 25)
    bright = (features[0, :12].mean(0) > 0).nonzero().flatten().tolist()
    assert bright == [j for j in range(25) if math.floor((j + 0.5) / 25 * 8) == 3] == [9, 10, 11]
    with pytest.raises(ValueError, match="must be an integer"):
        audio_spectrum(audio, 22050, 25.0)
    with pytest.raises(ValueError, match="frame rates"):
        aligned_video_features(video, torch.tensor([0.0]), 25, 25.0, grid=2)


def bouncing_clips(count: int, seed: int) -> dict:
    """`count` clips of 1 s of the world: one bouncing object on a plain background (16×16, 16 fps), its sound
    (a tone at every bounce, pitch by shape) and caption, as a batch of the audio-video datamodule."""
    videos, audio, captions = [], [], []
    for i in range(count):
        rng = np.random.default_rng(seed * 100_000 + i)
        background = sample_background(rng, SIZE, SIZE, 1.0, kinds=("plain",), pan=False)
        obj = sample_object(rng, 1, SIZE, SIZE, [], motion="bounce", radius_range=(0.15, 0.2))
        rendered = realise(SceneSpec(SIZE, SIZE, FPS, int(FPS), background, [obj]))
        videos.append(torch.from_numpy(rendered.frames).permute(3, 0, 1, 2).float() / 127.5 - 1)
        audio.append(torch.from_numpy(sonify(rendered.trajectory.events, {1: obj.shape}, 1.0, RATE)))
        captions.append(scene_caption(rendered.scene))
    return {"video": torch.stack(videos), "audio": torch.stack(audio), "text": captions,
            "fps": torch.full((count,), FPS), "sample_rate": RATE}


@pytest.fixture(scope="module")
def trained() -> tuple[AlignmentModel, dict]:
    threads = torch.get_num_threads()  # a module fixture runs before the function-scoped one_thread
    torch.set_num_threads(1)
    train = bouncing_clips(256, seed=1)
    batches = [{k: (v[s : s + 32] if isinstance(v, torch.Tensor | list) else v) for k, v in train.items()}
               for s in range(0, 256, 32)]
    model = fit_alignment(read_clips(batches, CONFIG, 256), CONFIG, log_every=0)
    held_out = bouncing_clips(64, seed=2)
    torch.set_num_threads(threads)
    return model, held_out


def test_trained_judge_separates_real_from_shuffled_and_shifted_pairs(trained) -> None:
    model, held_out = trained
    evaluator = AudioAlignmentEvaluator()
    evaluator.model = model
    for s in range(0, 64, 16):
        batch = {k: (v[s : s + 16] if isinstance(v, torch.Tensor | list) else v) for k, v in held_out.items()}
        shifted = batch["audio"].roll(RATE // 2, dims=-1)  # the clip's own soundtrack half a second late
        evaluator.update(shifted, batch, {})
    scores = evaluator.compute()
    # the real soundtrack (ceiling) against another clip's video (floor) and against itself shifted in time
    # (measured: real 0.46, another clip's video -0.05, shifted -0.21, retrieval 0.50 against chance 0.06; text 0.69
    # against another caption 0.11)
    assert scores["av_align_real"] > scores["av_align_real_shuffled"] + 0.25
    assert scores["av_align_real"] > scores["av_align"] + 0.25  # "generated" = the soundtrack shifted
    assert scores["av_retrieval_real"] > 4 * scores["av_retrieval_chance"]
    assert scores["av_retrieval_chance"] == pytest.approx(1 / 16)
    # text: the caption names the shape, the shape sets the pitch
    assert scores["text_relevance_real"] > scores["text_relevance_real_shuffled"] + 0.2
    assert set(scores) == {f"{m}{k}" for m in ("av_align", "text_relevance") for k in
                           ("", "_real", "_shuffled", "_real_shuffled")} | {"av_retrieval", "av_retrieval_real",
                                                                            "av_retrieval_chance"}
    first = {k: (v[:8] if isinstance(v, torch.Tensor | list) else v) for k, v in held_out.items()}
    per_frame = model.frame_scores(first["audio"], first["video"], first["fps"])
    assert per_frame.shape == (8, 25)  # 1 s at 25 Hz; each row sums to the clip's score with its own video
    av = model.scores(first["audio"], first["video"], first["fps"], first["text"])["av"]
    assert torch.allclose(per_frame.sum(1), av.diagonal(), atol=1e-5)
    features = model.audio_features(model.spectrum(first["audio"]))
    for embedding in (model.audio_pooled(features), model.text_embedding(first["text"]),
                      model.video_sequence(model.video_features(first["video"], first["fps"], 25))):
        assert torch.allclose(embedding.norm(dim=-1), torch.ones(8), atol=1e-5)  # one unit vector per clip
    sounding = first["audio"].flatten(1).abs().amax(1) > 0  # a clip without a bounce is silent: its sequence is ~0
    assert 0 < sounding.sum() < 8
    norms = model.audio_sequence(features).norm(dim=-1)
    assert torch.allclose(norms[sounding], torch.ones(int(sounding.sum())), atol=1e-5) and norms[~sounding].max() < 0.01
    single = AudioAlignmentEvaluator()
    single.model = model
    single.update(first["audio"][:1], {k: (v[:1] if isinstance(v, torch.Tensor | list) else v) for k, v in first.items()},
                  {})
    assert set(single.compute()) == {"av_align", "av_align_real", "text_relevance", "text_relevance_real"}  # no pairs
    silence = model.scores(torch.zeros_like(first["audio"]), first["video"], first["fps"], first["text"])["av"]
    assert silence.abs().max().item() < 1e-3  # no change in time, no agreement: silence scores 0 with any video
    with pytest.raises(ValueError, match="reads 8000 Hz"):
        model.scores(held_out["audio"][:2], held_out["video"][:2], FPS, held_out["text"][:2], sample_rate=16000)
    with pytest.raises(ValueError, match=r"lacks \['audio'\]"):
        evaluator.update(held_out["audio"][:2], {k: v for k, v in held_out.items() if k != "audio"}, {})


def test_judge_cache_round_trip_loads_weights_only(trained, tmp_path: Path) -> None:
    model, held_out = trained
    key = {"shards": ["world/train-000000.tar"], "config": {"steps": CONFIG.steps}}
    calls = []

    def train() -> AlignmentModel:
        calls.append(1)
        return model

    cached_network(tmp_path, "audio_alignment", key, train, lambda _: AlignmentModel(CONFIG))
    (path,) = tmp_path.glob("audio_alignment-*.pt")
    state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: no pickled objects
    assert set(state) == set(model.state_dict())
    loaded = cached_network(tmp_path, "audio_alignment", key, train, lambda _: AlignmentModel(CONFIG)).eval()
    assert len(calls) == 1  # the second call read the file
    batch = {k: (v[:8] if isinstance(v, torch.Tensor | list) else v) for k, v in held_out.items()}
    before = model.scores(batch["audio"], batch["video"], FPS, batch["text"])
    after = loaded.scores(batch["audio"], batch["video"], FPS, batch["text"])
    assert torch.equal(before["av"], after["av"]) and torch.equal(before["text"], after["text"])


@pytest.mark.slow
def test_evaluator_trains_on_a_datamodule_once_and_then_reads_its_cache(outputs: Path, tmp_path: Path, capsys) -> None:
    """The test loop's way: `start` trains the judge on the datamodule's training clips (real shards, PyAV) and
    caches it; a second `start` reads the file; real audio scored as the generated one gives the real figures."""
    from types import SimpleNamespace

    import hydra

    from experiments.compose import compose_config

    cfg = compose_config(["experiment=audio_v2a", "model.codec.checkpoint=null", "data.world.scenes=[16,8]",
                          "data.num_workers=0", f"model.evaluators.alignment.cache_dir={tmp_path / 'judges'}",
                          "model.evaluators.alignment.clips=32", "model.evaluators.alignment.steps=20",
                          "model.evaluators.alignment.batch=16"], outputs / "job")
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="object")
    datamodule.prepare_data()
    evaluator = hydra.utils.instantiate(cfg.model.evaluators.alignment, _convert_="object")
    trainer = SimpleNamespace(datamodule=datamodule, fast_dev_run=False)  # what `start` reads of a Lightning trainer
    evaluator.start(None, trainer)
    assert "step 20/20" in capsys.readouterr().out
    assert len(list((tmp_path / "judges").glob("audio_alignment-*.pt"))) == 1
    evaluator.start(None, trainer)
    assert "[audio alignment]" not in capsys.readouterr().out  # read from the cache
    datamodule.setup("validate")
    batch = next(iter(datamodule.val_dataloader()))
    evaluator.update(batch["audio"], batch, {})
    scores = evaluator.compute()
    assert scores["av_align"] == pytest.approx(scores["av_align_real"], abs=1e-6)
    assert scores["text_relevance"] == pytest.approx(scores["text_relevance_real"], abs=1e-6)
    evaluator.start(None, SimpleNamespace(datamodule=datamodule, fast_dev_run=True))  # a wiring check: no judge
    evaluator.update(batch["audio"], batch, {})
    assert evaluator.compute() == {}
