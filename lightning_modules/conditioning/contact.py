"""Training the V2A line's contact detector (`nn.contact.ContactEncoder`) once per world, from its clips alone.

No labels beyond the data: a clip's own soundtrack says when something hit something. For clip i with frames at
`fps`, the labels are the frames its onsets fall on,

    y_ik = 1  if some onset τ of `evaluation.audio.detect_onsets(audio_i)` has round(τ · fps) = k,  else 0

and the detector minimises the class-weighted binary cross-entropy

    L = mean_ik [ −p · y_ik log σ(ℓ_ik) − (1 − y_ik) log(1 − σ(ℓ_ik)) ],   p = (1 − ȳ) / ȳ

(ȳ the share of onset frames, so both classes weigh the same), with random flips and transposes of the frames
(a bounce is one in any direction). The detector is cached beside the probes, keyed by the shards, the clip
length and these settings (`evaluation.base.cached_network`), and loaded into the conditioner's frozen encoder
by `AudioGenerationModule.setup` before fitting.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from lightning_modules.evaluation.audio import detect_onsets
from lightning_modules.evaluation.base import cached_network
from lightning_modules.evaluation.probe import _video_source, train_batches
from lightning_modules.nn.contact import ContactEncoder


@dataclass
class ContactConfig:
    """width: the detector's channels; clips: training clips read once; steps, batch, lr: its training."""

    width: int = 32
    clips: int = 1536
    steps: int = 600
    batch: int = 32
    lr: float = 2e-3
    seed: int = 0


def onset_frame_labels(audio: torch.Tensor, sample_rate: int, fps: float, frames: int) -> torch.Tensor:
    """Labels y [B, frames] from soundtracks [B, c, S]: 1 on the frames onsets fall on (module docstring)."""
    labels = torch.zeros(audio.shape[0], frames)
    for i, clip in enumerate(audio):
        for onset in detect_onsets(clip.float(), sample_rate):
            k = round(onset * fps)
            if 0 <= k < frames:
                labels[i, k] = 1.0
    return labels


def fit_contact_encoder(video: torch.Tensor, labels: torch.Tensor, config: ContactConfig,
                        progress: bool = True) -> ContactEncoder:
    """The detector trained on clips [N, 3, T, H, W] with frame labels [N, T] (module docstring)."""
    torch.manual_seed(config.seed)
    encoder = ContactEncoder(config.width)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=config.lr)
    share = labels.mean().clamp(1e-3, 0.5)
    weight = (1 - share) / share
    g = torch.Generator().manual_seed(config.seed)
    for _ in tqdm(range(config.steps), desc="contact detector", disable=not progress):
        index = torch.randint(0, len(video), (config.batch,), generator=g)
        clips = video[index].float()
        if bool(torch.rand((), generator=g) < 0.5):
            clips = clips.flip(-1)
        if bool(torch.rand((), generator=g) < 0.5) and clips.shape[-1] == clips.shape[-2]:
            clips = clips.transpose(-1, -2)
        _, logit = encoder(clips)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, labels[index], pos_weight=weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return encoder.eval()


def read_labelled_clips(batches: Iterable[dict[str, Any]], clips: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(video [N, 3, T, H, W] as float16, onset-frame labels [N, T]) of the first `clips` clips of equal shape."""
    videos, labels = [], []
    for batch in batches:
        fps = float(torch.as_tensor(batch["fps"]).flatten()[0])
        videos.append(batch["video"].half())
        labels.append(onset_frame_labels(batch["audio"], int(batch["sample_rate"]), fps, batch["video"].shape[2]))
        if sum(len(v) for v in videos) >= clips:
            break
    shape = videos[0].shape[1:]
    keep = [i for i, v in enumerate(videos) if v.shape[1:] == shape]
    return torch.cat([videos[i] for i in keep])[:clips], torch.cat([labels[i] for i in keep])[:clips]


def contact_encoder_from_datamodule(datamodule: Any, config: ContactConfig,
                                    cache_dir: str | Path | None) -> ContactEncoder:
    """The detector for an audio-video datamodule's training clips, trained once and cached as
    `<cache_dir>/contact-<hash>.pt`."""
    source = _video_source(datamodule)

    def train() -> ContactEncoder:
        batch_size = int(getattr(datamodule, "batch_size", 8) or 8)
        print(f"[contact] reading {config.clips} training clips and the onsets of their soundtracks", flush=True)
        with torch.inference_mode(False):
            video, labels = read_labelled_clips(train_batches(datamodule, math.ceil(config.clips / batch_size),
                                                              seed=config.seed), config.clips)
            print(f"[contact] training on {len(video)} clips ({float(labels.mean()):.3f} of frames start a sound)",
                  flush=True)
            return fit_contact_encoder(video, labels, config)

    key = {"shards": source.shards, "frames": list(getattr(datamodule, "frames", []) or []),
           "fps": getattr(datamodule, "fps", None), "config": asdict(config), "version": 1}
    return cached_network(cache_dir, "contact", key, train, lambda _: ContactEncoder(config.width))
