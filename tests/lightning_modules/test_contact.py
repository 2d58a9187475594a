"""The V2A line's contact detector: labels from the soundtracks, the conditioner's features, training, the cache."""

from __future__ import annotations

import math
from pathlib import Path

import hydra
import pytest
import torch

from datamodules.media import decode_audio
from datamodules.synthetic import WorldConfig, world_sample
from experiments.compose import compose_config
from lightning_modules.conditioning.audio import VideoFrameFeatures, frames_on_screen
from lightning_modules.conditioning.contact import (
    ContactConfig,
    contact_encoder_from_datamodule,
    fit_contact_encoder,
    onset_frame_labels,
)
from lightning_modules.nn.contact import ContactEncoder


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """P(score of a positive > score of a negative), by counting pairs."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    return float((pos[:, None] > neg[None, :]).float().mean())


def test_onset_labels_are_the_frames_of_the_worlds_events() -> None:
    """Onsets detected in the world's wavs fall on the frames its json lists for the events (frame = time · fps)."""
    world = WorldConfig(sizes=[[32, 32]], fps=[16.0], durations=[1.0])
    checked = 0
    for index in range(8):
        sample = world_sample(world, "scenes", "val", index)
        audio, _ = decode_audio(sample["wav"], 8000, start=0.0, duration=1.0)
        labels = onset_frame_labels(audio[None], 8000, 16.0, 16)[0]
        expected = torch.zeros(16)
        for event in sample["json"]["events"]:
            if event["frame"] < 16:
                expected[event["frame"]] = 1.0
        assert torch.equal(labels, expected), (index, labels.nonzero().flatten(), expected.nonzero().flatten())
        checked += int(expected.sum())
    assert checked >= 4


def test_conditioner_features_are_the_frozen_detectors_on_the_frame_on_screen() -> None:
    conditioner = VideoFrameFeatures(dim=8, latent_rate=50.0, contact={"width": 4})
    assert conditioner.projection.in_features == 9 == conditioner.encoder.features
    assert not any(p.requires_grad for p in conditioner.encoder.parameters())
    assert any(k.startswith("encoder.") for k in conditioner.state_dict())  # saved with the checkpoint
    video = torch.rand(2, 3, 8, 16, 16) * 2 - 1
    raw = conditioner.inputs({"video": video, "fps": torch.tensor([8.0, 16.0]), "text": ["", ""]}, None,
                             (8, 50, 1, 1), True)
    per_frame = conditioner.encoder.frame_features(video)
    for b, fps in enumerate((8.0, 16.0)):
        for j in range(50):
            k = min(7, math.floor((j + 0.5) / 50 * fps))
            assert torch.allclose(raw[b, j], per_frame[b, k])
    assert frames_on_screen(8, 16.0, 50, 50.0)[-1] == 7  # a 0.5 s clip under a 1 s latent: the last frame holds


def test_the_detector_learns_which_frames_flash() -> None:
    """Clips of noise with a bright square on some frames; labels on those frames: after 80 steps the detector
    ranks flash frames of new clips above the others (AUC), where an untrained one is near chance."""
    g = torch.Generator().manual_seed(0)

    def clips(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        video = torch.rand(n, 3, 8, 12, 12, generator=g) * 0.4 - 0.8
        labels = (torch.rand(n, 8, generator=g) < 0.25).float()
        for i, k in labels.nonzero().tolist():
            y, x = torch.randint(0, 8, (2,), generator=g).tolist()
            video[i, :, k, y : y + 4, x : x + 4] = 1.0
        return video, labels

    train, train_labels = clips(64)
    test, test_labels = clips(32)
    untrained = auc(ContactEncoder(8)(test)[1].detach().flatten(), test_labels.flatten())
    encoder = fit_contact_encoder(train, train_labels, ContactConfig(width=8, steps=80, batch=16, lr=3e-3),
                                  progress=False)
    trained = auc(encoder(test)[1].detach().flatten(), test_labels.flatten())
    assert trained > 0.95 and trained > untrained + 0.2


@pytest.mark.slow
def test_detector_is_trained_once_per_world_and_read_back(tmp_path: Path) -> None:
    cfg = compose_config(["experiment=audio_v2a", "data.world.scenes=[16,8]", "data.num_workers=0",
                          f"paths.data_dir={tmp_path / 'data'}"], tmp_path / "run")
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="object")
    datamodule.prepare_data()
    config = ContactConfig(width=4, clips=16, steps=3, batch=4)
    first = contact_encoder_from_datamodule(datamodule, config, tmp_path / "probes")
    cached = list((tmp_path / "probes").glob("contact-*.pt"))
    assert len(cached) == 1 and torch.load(cached[0], weights_only=True)
    again = contact_encoder_from_datamodule(datamodule, config, tmp_path / "probes")
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
