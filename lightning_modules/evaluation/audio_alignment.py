"""Learned audio-video alignment and audio-text relevance for Movie Gen Audio (§6; the paper scores with ImageBind
and CLAP): a small contrastive model trained once per world on its real clips, then used as a judge.

Three towers map a clip to embeddings; the audio and video towers keep time:

    a_j  = A(x)_j ∈ R^D      audio tower: log-magnitude STFT of the wav (hop = sample_rate / (4r), window 4 hops),
                             scaled to [0, 1] from −80 dB (silence = 0), a stride-4 convolution to the common
                             rate r (aligned frame j reads STFT frames 4j … 4j+3, centred in [j/r, (j+1)/r)),
                             dilated temporal convolutions (`TemporalStack`), a 1x1 projection
    v_j  = V(video)_j ∈ R^D  video tower: `conditioning.audio.video_frame_features` (each frame pooled to g×g and
                             its change from the previous one), the frame on screen at each aligned frame's centre
                             (`frames_on_screen`, the same rule as the V2A conditioner), (2+1)D convolutions over
                             the g×g maps shared across positions (`GridTower`), dilated temporal convolutions,
                             a 1x1 projection
    t    = T(caption)        text tower: `nn.text.WordEncoder` word embeddings (no attention blocks: a bag of words
                             with positions), mean over the words, an MLP
    p    = P(max_j h_j)      the audio trunk's features h_j max-pooled over time (which tones are heard), an MLP

The alignment embedding of a clip is its whole sequence, centred over time, flattened and normalised, so that a
tone scores only where the video shows its bounce (the score keeps time; a soundtrack on another clip, or its own
soundtrack shifted, scores lower; silence, with nothing changing, scores 0):

    e_a = vec(a_1 − ā … a_n − ā) / ‖·‖,   e_v likewise,   av(x, video) = ⟨e_a, e_v⟩ = Σ_j ⟨a_j − ā, v_j − v̄⟩ / (‖·‖ ‖·‖)
    tr(x, caption) = ⟨p / ‖p‖, t / ‖t‖⟩                                   (text relevance, CLAP-style)

Training (InfoNCE over the batch, both directions, learnt scale s = exp(log_scale) ≤ 100):

    InfoNCE(X, Y) = ½ [ CE(s·X Yᵀ, I) + CE(s·Y Xᵀ, I) ]     rows of X, Y unit vectors; CE with target i for row i
    L = InfoNCE(E_a, E_v) + InfoNCE(P, T) + CE over [s·E_v E_aᵀ | s·⟨e_v,i, e_ã,i⟩] (the clip's own soundtrack
        rolled in time by 0.2–0.8 of its length as one more negative per video: timing, not only pitch ↔ shape)

on `clips` training clips (random 1 s crops of the datamodule's training split, read once), `augment`ed: a random
gain of the audio (log-uniform in [1/4, 2]: the judge does not score loudness) and flips, transposes and colour
permutations of the video maps (a bounce keeps its time). The model is cached next to the world
(`base.cached_network`, keyed by the shards, the clip length and frame rate, and the config).

`AudioAlignmentEvaluator` reports, over the test loop's clips (generated audio for each clip's conditions):

    av_align             mean av(generated_i, video_i)               av_align_real      the real soundtrack (ceiling)
    av_align_shuffled    mean av(generated_i, video_{i+1})           av_align_real_shuffled  real_i vs video_{i+1}
    av_retrieval         fraction of clips whose generated audio is closest to its own video among the batch's
    av_retrieval_real    the same for the real soundtracks          av_retrieval_chance  mean 1 / batch size
    text_relevance       mean tr(generated_i, caption_i)             text_relevance_real (ceiling)
    text_relevance_shuffled   mean tr(generated_i, caption_{i+1}) (floor; another caption may name the same shapes)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from lightning_modules.conditioning.audio import frames_on_screen, video_frame_features
from lightning_modules.evaluation.audio import stft_magnitude
from lightning_modules.evaluation.base import Evaluator, cached_network
from lightning_modules.evaluation.probe import _video_source, available_clips, train_batches
from lightning_modules.nn.text import WordEncoder

FLOOR_DB = -80.0  # the log-magnitude scale's zero (silence)
MAX_LOG_SCALE = math.log(100.0)


@dataclass
class AlignmentConfig:
    """The model's sizes and its training. sample_rate: of the audio it reads; rate: aligned frames a second;
    grid: the video features' pooling grid; width: the towers' channels; dim: embedding width (per aligned frame
    for audio-video, whole clip for audio-text); clips: training clips read once; steps, batch, lr: training."""

    sample_rate: int = 8000
    rate: float = 25.0
    grid: int = 8
    width: int = 64
    dim: int = 32
    clips: int = 1024
    steps: int = 600
    batch: int = 64
    lr: float = 2e-3
    seed: int = 0


def info_nce(x: torch.Tensor, y: torch.Tensor, log_scale: torch.Tensor | float) -> torch.Tensor:
    """½ [CE(s·X Yᵀ, I) + CE(s·Y Xᵀ, I)], s = exp(log_scale), for matched rows x_i ↔ y_i of unit vectors [B, D]."""
    logits = torch.as_tensor(log_scale).exp() * x @ y.T
    target = torch.arange(len(x), device=x.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def aligned_frames(samples: int, sample_rate: int, rate: float) -> int:
    """n = ⌊duration · r⌋ aligned frames of a clip of `samples` audio samples (at least 1)."""
    return max(1, math.floor(samples / sample_rate * rate + 1e-9))


def audio_spectrum(audio: torch.Tensor, sample_rate: int, rate: float) -> torch.Tensor:
    """Audio [B, c, S] or [B, S] → the audio tower's input [B, F, 4n]: |STFT| with hop h = sample_rate / (4r) and a
    Hann window of 4h (F = 2h + 1 bins), divided by h (a full-scale tone's peak ≈ 1), in dB from FLOOR_DB to 0
    mapped to [0, 1]; frame m (centred at m·h) for m < 4n."""
    hop = sample_rate / (4 * rate)
    if abs(hop - round(hop)) > 1e-9:
        raise ValueError(f"audio alignment: sample_rate / (4 * rate) = {sample_rate} / {4 * rate} must be an integer")
    hop = round(hop)
    mono = audio.float().mean(1) if audio.ndim == 3 else audio.float()
    n = aligned_frames(mono.shape[-1], sample_rate, rate)
    magnitude = stft_magnitude(mono, 4 * hop, hop)[..., : 4 * n] / hop
    db = 20 * torch.log10(magnitude.clamp_min(10 ** (FLOOR_DB / 20)))
    return (db - FLOOR_DB) / -FLOOR_DB


def aligned_video_features(video: torch.Tensor, fps: torch.Tensor | float, frames: int, rate: float,
                           grid: int) -> torch.Tensor:
    """Video [B, 3, T, H, W] in [-1, 1] at `fps` (a number or [B]) → [B, 6g², frames]: the features of the frame on
    screen at each aligned frame's centre (j + ½)/r."""
    features = video_frame_features(video, grid)  # [B, T, 6g²]
    fps = torch.as_tensor(fps, dtype=torch.float64).flatten().expand(video.shape[0])
    if bool((fps <= 0).any()):
        raise ValueError("audio alignment: the clips' frame rates (batch['fps']) must be > 0")
    index = torch.stack([frames_on_screen(video.shape[2], float(f), frames, rate) for f in fps]).to(features.device)
    aligned = torch.gather(features, 1, index[..., None].expand(-1, -1, features.shape[-1]))
    return rearrange(aligned, "b t c -> b c t")


def sequence_embedding(x: torch.Tensor) -> torch.Tensor:
    """Per-frame embeddings [B, D, n] → e = vec(x_j − x̄) / ‖vec(x_j − x̄)‖ [B, n·D], x̄ the mean over the frames: what
    stays the same through the clip (silence, a still scene) drops out, and ⟨e_a, e_v⟩ correlates the two
    tracks' changes in time (a clip with no change at all embeds as 0 and scores 0)."""
    centred = x - x.mean(-1, keepdim=True)
    # eps: a constant track's rounding residue (~1e-7) stays ~0 instead of being blown up to a unit vector
    return F.normalize(rearrange(centred, "b d t -> b (t d)"), dim=-1, eps=1e-4)


class TemporalStack(nn.Module):
    """x [B, C_in, n] → [B, W, n]: a kernel-3 convolution, then residual GELU convolutions of kernel 5 with
    dilations 1, 2, 4 (receptive field ±15 frames, 0.6 s at 25 Hz). Padding repeats the end frames: a constant
    input gives a constant output (zero padding would mark the clip's ends, which every pair of tracks shares)."""

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        self.inp = nn.Conv1d(in_channels, width, 3, padding=1, padding_mode="replicate")
        self.blocks = nn.ModuleList(nn.Conv1d(width, width, 5, padding=2 * d, dilation=d, padding_mode="replicate")
                                    for d in (1, 2, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = x + block(F.gelu(x))
        return F.gelu(x)


class GridTower(nn.Module):
    """Aligned video features [B, 6g², n] (the frame pooled to g×g and its change) → [B, 2·C₂, n]: factorised
    (2+1)D convolutions over the g×g maps, shared across positions (a bounce looks the same anywhere): 3×3 spatial
    (6 → C₁), kernel-3 temporal, 3×3 spatial with stride 2 (C₁ → C₂), kernel-3 temporal, each followed by a GELU;
    then the mean and the max over positions. Padding repeats the edges (see `TemporalStack`)."""

    def __init__(self, grid: int, hidden: int = 16, out: int = 32) -> None:
        super().__init__()
        self.grid = grid
        self.layers = nn.ModuleList([
            nn.Conv3d(6, hidden, (1, 3, 3), padding=(0, 1, 1), padding_mode="replicate"),
            nn.Conv3d(hidden, hidden, (3, 1, 1), padding=(1, 0, 0), padding_mode="replicate"),
            nn.Conv3d(hidden, out, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), padding_mode="replicate"),
            nn.Conv3d(out, out, (3, 1, 1), padding=(1, 0, 0), padding_mode="replicate"),
        ])

    def forward(self, video_inputs: torch.Tensor) -> torch.Tensor:
        x = rearrange(video_inputs, "b (c h w) t -> b c t h w", c=6, h=self.grid, w=self.grid)
        for layer in self.layers:
            x = F.gelu(layer(x))
        return torch.cat([x.mean((-2, -1)), x.amax((-2, -1))], dim=1)


class AlignmentModel(nn.Module):
    """The three towers of the module docstring. `audio_sequence(audio)`, `video_sequence(video, fps)` → unit
    alignment embeddings [B, n·D]; `audio_pooled(audio)`, `text_embedding(captions)` → unit vectors [B, D]."""

    def __init__(self, config: AlignmentConfig) -> None:
        super().__init__()
        self.config = config
        hop = round(config.sample_rate / (4 * config.rate))
        width = config.width
        self.audio_in = nn.Conv1d(2 * hop + 1, width, 4, stride=4)  # 4 STFT frames → one aligned frame
        self.audio_trunk = TemporalStack(width, width)
        self.audio_head = nn.Conv1d(width, config.dim, 1)
        self.video_trunk = nn.Sequential(GridTower(config.grid), TemporalStack(64, width))
        self.video_head = nn.Conv1d(width, config.dim, 1)
        self.pooled_head = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, config.dim))
        self.words = WordEncoder(dim=width, depth=0, heads=1, max_length=48, buckets=512)
        self.text_head = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, config.dim))
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    @property
    def device(self) -> torch.device:
        return self.log_scale.device

    def _check_rate(self, sample_rate: int | None) -> None:
        if sample_rate is not None and int(sample_rate) != self.config.sample_rate:
            raise ValueError(f"audio alignment: the model reads {self.config.sample_rate} Hz audio, got "
                             f"{int(sample_rate)} Hz")

    def spectrum(self, audio: torch.Tensor, sample_rate: int | None = None) -> torch.Tensor:
        """Audio [B, c, S] → the audio tower's input [B, F, 4n] (see `audio_spectrum`)."""
        self._check_rate(sample_rate)
        return audio_spectrum(audio.to(self.device), self.config.sample_rate, self.config.rate)

    def audio_features(self, spectrum: torch.Tensor) -> torch.Tensor:
        """The audio tower's input [B, F, 4n] → the audio trunk's features h [B, W, n]."""
        return self.audio_trunk(self.audio_in(spectrum.to(self.device)))

    def video_features(self, video: torch.Tensor, fps: torch.Tensor | float, frames: int) -> torch.Tensor:
        """Video [B, 3, T, H, W] → the video tower's input [B, 6g², frames] (see `aligned_video_features`)."""
        return aligned_video_features(video.to(self.device), fps, frames, self.config.rate, self.config.grid)

    def audio_sequence(self, features: torch.Tensor) -> torch.Tensor:
        """Audio trunk features [B, W, n] → unit alignment embeddings [B, n·D]."""
        return sequence_embedding(self.audio_head(features))

    def video_sequence(self, video_inputs: torch.Tensor) -> torch.Tensor:
        """Aligned video features [B, 6g², n] → unit alignment embeddings [B, n·D]."""
        return sequence_embedding(self.video_head(self.video_trunk(video_inputs)))

    def audio_pooled(self, features: torch.Tensor) -> torch.Tensor:
        """Audio trunk features [B, W, n] → unit audio-text embeddings [B, D] (max over time)."""
        return F.normalize(self.pooled_head(features.amax(-1)), dim=-1)

    def text_embedding(self, captions: Sequence[str]) -> torch.Tensor:
        """Captions → unit audio-text embeddings [B, D] (word embeddings averaged over the words)."""
        tokens, mask = self.words(list(captions))
        weights = mask.float()[..., None]
        mean = (tokens * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return F.normalize(self.text_head(mean), dim=-1)

    @torch.no_grad()
    def scores(self, audio: torch.Tensor, video: torch.Tensor, fps: torch.Tensor | float, captions: Sequence[str],
               sample_rate: int | None = None) -> dict[str, torch.Tensor]:
        """The judge on a batch: "av" [B, B] = av(audio_i, video_j) and "text" [B, B] = tr(audio_i, caption_j)."""
        features = self.audio_features(self.spectrum(audio, sample_rate))
        e_a = self.audio_sequence(features)
        e_v = self.video_sequence(self.video_features(video, fps, features.shape[-1]))
        return {"av": e_a @ e_v.T, "text": self.audio_pooled(features) @ self.text_embedding(captions).T}


    @torch.no_grad()
    def frame_scores(self, audio: torch.Tensor, video: torch.Tensor, fps: torch.Tensor | float,
                     sample_rate: int | None = None) -> torch.Tensor:
        """Each aligned frame's share of av(audio_i, video_i): ⟨a_j − ā, v_j − v̄⟩ / (‖a − ā‖ ‖v − v̄‖) [B, n]
        (a row sums to av; where in time the judge finds the two tracks agreeing)."""
        features = self.audio_features(self.spectrum(audio, sample_rate))
        n = features.shape[-1]
        e_a = rearrange(self.audio_sequence(features), "b (t d) -> b t d", t=n)
        e_v = rearrange(self.video_sequence(self.video_features(video, fps, n)), "b (t d) -> b t d", t=n)
        return (e_a * e_v).sum(-1)


# ----------------------------------------------------------------------------------------------------------------
# training


@dataclass
class TrainingClips:
    """Clips read once for training, cut to a common length of n aligned frames: the audio tower's inputs
    [N, F, 4n], aligned video features [N, 6g², n], captions."""

    spectra: torch.Tensor
    video: torch.Tensor
    captions: list[str]


def read_clips(batches: Iterable[dict[str, Any]], config: AlignmentConfig, clips: int) -> TrainingClips:
    """Up to `clips` clips of batches with "video", "fps", "audio", "sample_rate" and "text" (the datamodule's
    training batches), each cut to the shortest clip's aligned length."""
    spectra, video, captions = [], [], []
    for batch in batches:
        if batch.get("audio") is None or batch.get("video") is None:
            raise ValueError("audio alignment: training batches need 'audio' and 'video' (an AudioVideoDataModule)")
        rate = int(batch.get("sample_rate") or config.sample_rate)
        if rate != config.sample_rate:
            raise ValueError(f"audio alignment: config.sample_rate={config.sample_rate}, the data's {rate} Hz")
        spectrum = audio_spectrum(batch["audio"], rate, config.rate)
        n = spectrum.shape[-1] // 4
        spectra.extend(spectrum)
        video.extend(aligned_video_features(batch["video"], batch["fps"], n, config.rate, config.grid))
        captions.extend(batch["text"])
        if len(spectra) >= clips:
            break
    if len(spectra) < 2:
        raise ValueError("audio alignment: need at least 2 training clips with audio and video")
    n = min(v.shape[-1] for v in video)
    return TrainingClips(torch.stack([a[:, : 4 * n] for a in spectra[:clips]]),
                         torch.stack([v[:, :n] for v in video[:clips]]), captions[:clips])


def augment(spectra: torch.Tensor, video: torch.Tensor, grid: int,
            generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Changes that keep a clip's events and pitches: per clip, the audio's gain g (log-uniform in [1/4, 2]: the
    [0, 1] dB scale shifts by 20·log10(g)/80, clamped at 0, so quiet clips also get a noise floor), and the
    video's pooled maps flipped left-right and up-down and transposed (each with probability ½) and its RGB
    channels permuted (the same way in the frame and in its change)."""
    gain_db = torch.empty(len(spectra), 1, 1).uniform_(20 * math.log10(0.25), 20 * math.log10(2.0),
                                                       generator=generator)
    spectra = (spectra + gain_db.to(spectra) / -FLOOR_DB).clamp(0.0, 1.0)
    maps = rearrange(video, "b (c h w) t -> b c h w t", c=6, h=grid, w=grid)
    out = []
    for clip in maps:
        flips = torch.rand(3, generator=generator) < 0.5
        if flips[0]:
            clip = clip.flip(2)
        if flips[1]:
            clip = clip.flip(1)
        if flips[2]:
            clip = clip.transpose(1, 2)
        perm = torch.randperm(3, generator=generator)
        out.append(clip[torch.cat([perm, perm + 3])])
    return spectra, rearrange(torch.stack(out), "b c h w t -> b (c h w) t")


def alignment_loss(model: AlignmentModel, spectra: torch.Tensor, video_inputs: torch.Tensor,
                   captions: Sequence[str], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """L of the module docstring on a minibatch (spectra [B, F, 4n], aligned video features [B, 6g², n]): its
    terms "av", "text", "shifted" and "loss" (their sum)."""
    features = model.audio_features(spectra)
    e_a, e_v = model.audio_sequence(features), model.video_sequence(video_inputs.to(model.device))
    log_scale = model.log_scale.clamp(max=MAX_LOG_SCALE)
    av = info_nce(e_a, e_v, log_scale)
    text = info_nce(model.audio_pooled(features), model.text_embedding(captions), log_scale)
    n = features.shape[-1]
    shifts = torch.randint(max(1, round(0.2 * n)), max(2, round(0.8 * n) + 1), (len(spectra),), generator=generator)
    index = (torch.arange(n)[None] - shifts[:, None]) % n  # rolled in time by shift_i aligned frames
    rolled = torch.gather(features, 2, index[:, None].expand(-1, features.shape[1], -1).to(features.device))
    e_rolled = model.audio_sequence(rolled)
    logits = log_scale.exp() * torch.cat([e_v @ e_a.T, (e_v * e_rolled).sum(-1, keepdim=True)], dim=1)
    shifted = F.cross_entropy(logits, torch.arange(len(spectra), device=logits.device))
    return {"av": av, "text": text, "shifted": shifted, "loss": av + text + shifted}


def fit_alignment(data: TrainingClips, config: AlignmentConfig, device: torch.device | str = "cpu",
                  log_every: int = 100) -> AlignmentModel:
    """Train the model on clips read once (AdamW, one-cycle learning rate, minibatches drawn without replacement
    within each pass, `augment`ed); progress printed every `log_every` steps. Returns it in eval mode."""
    with torch.inference_mode(False), torch.enable_grad():
        state = torch.random.get_rng_state()
        torch.manual_seed(config.seed)
        model = AlignmentModel(config).to(device)
        torch.random.set_rng_state(state)
        generator = torch.Generator().manual_seed(config.seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-2)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=config.steps,
                                                       pct_start=0.1)
        batch = min(config.batch, len(data.captions))
        order: list[int] = []
        for step in range(config.steps):
            if len(order) < batch:
                order += torch.randperm(len(data.captions), generator=generator).tolist()
            chosen, order = order[:batch], order[batch:]
            spectra, video = augment(data.spectra[chosen], data.video[chosen], config.grid, generator)
            losses = alignment_loss(model, spectra, video, [data.captions[i] for i in chosen], generator)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            optimizer.step()
            schedule.step()
            if log_every and (step % log_every == 0 or step == config.steps - 1):
                print(f"[audio alignment] step {step + 1}/{config.steps}: " +
                      " ".join(f"{k} {v.item():.3f}" for k, v in losses.items()), flush=True)
    return model.eval().requires_grad_(False)


def alignment_from_datamodule(datamodule: Any, config: AlignmentConfig, cache_dir: str | Path | None,
                              device: torch.device | str = "cpu") -> AlignmentModel:
    """The judge for an audio-video datamodule's training clips (its first video source), trained once and
    cached as `<cache_dir>/audio_alignment-<hash>.pt` (hash of the shards, the datamodule's clip length and
    frame rate, the version and `config`)."""
    source = _video_source(datamodule)
    rate = int(getattr(datamodule, "sample_rate", config.sample_rate))
    if rate != config.sample_rate:
        config = AlignmentConfig(**{**asdict(config), "sample_rate": rate})

    def train() -> AlignmentModel:
        available = available_clips(datamodule) or config.clips
        batch_size = int(getattr(datamodule, "batch_size", 8) or 8)
        passes = math.ceil(config.clips / available)  # each pass reads other random crops of the clips
        per_pass = math.ceil(min(config.clips, available) / batch_size)

        def batches() -> Iterable[dict[str, Any]]:
            for p in range(passes):
                yield from train_batches(datamodule, per_pass, seed=config.seed + p)

        print(f"[audio alignment] reading {config.clips} training clips ({passes} passes over {available})", flush=True)
        with torch.inference_mode(False):
            data = read_clips(batches(), config, config.clips)
        print(f"[audio alignment] training on {len(data.captions)} clips of {data.video.shape[-1] / config.rate:g} s",
              flush=True)
        return fit_alignment(data, config, device)

    key = {"shards": source.shards, "frames": list(getattr(datamodule, "frames", []) or []),
           "fps": getattr(datamodule, "fps", None), "config": asdict(config), "version": 2}
    model = cached_network(cache_dir, "audio_alignment", key, train, lambda _: AlignmentModel(config))
    return model.to(device).eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------------
# the evaluator


class AudioAlignmentEvaluator(Evaluator):
    """Learned audio-video alignment (ImageBind-like) and audio-text relevance (CLAP-like) of generated audio,
    judged by a model trained once per world on its real clips (see the module docstring for what is logged).
    Needs batches with "video", "fps", "audio" (the real soundtrack), "text" and "sample_rate". Under
    `trainer.fast_dev_run` (a wiring check) the judge is not trained and nothing is logged.

    Args:
        cache_dir: where trained judges are kept (None: trained every time); the rest: `AlignmentConfig`.
    """

    def __init__(self, cache_dir: str | None = None, rate: float = 25.0, grid: int = 8, width: int = 64,
                 dim: int = 32, clips: int = 1024, steps: int = 600, batch: int = 64, lr: float = 2e-3,
                 seed: int = 0) -> None:
        self.cache_dir = cache_dir
        self.config = AlignmentConfig(rate=rate, grid=grid, width=width, dim=dim, clips=clips, steps=steps,
                                      batch=batch, lr=lr, seed=seed)
        self.start(None, None)

    def start(self, module: Any, trainer: Any) -> None:
        self.values: dict[str, list[torch.Tensor]] = {}
        self.model: AlignmentModel | None = None
        if trainer is None or getattr(trainer, "datamodule", None) is None or trainer.fast_dev_run:
            return
        self.model = alignment_from_datamodule(trainer.datamodule, self.config, self.cache_dir,
                                               getattr(module, "device", "cpu"))

    def _add(self, name: str, values: torch.Tensor) -> None:
        self.values.setdefault(name, []).append(values.detach().float().cpu().flatten())

    def update(self, generated: torch.Tensor, batch: dict[str, Any], extras: dict[str, torch.Tensor]) -> None:
        """Generated audio [B, c, S] for the batch's clips; the batch's real soundtracks are scored too."""
        if self.model is None:
            return
        missing = [k for k in ("video", "fps", "audio", "text") if batch.get(k) is None]
        if missing:
            raise ValueError(f"AudioAlignmentEvaluator: the batch lacks {missing} (needs an audio-video datamodule)")
        size = generated.shape[0]
        video, fps, real, captions = batch["video"][:size], batch["fps"], batch["audio"][:size], batch["text"][:size]
        fps = torch.as_tensor(fps).flatten()[:size] if torch.as_tensor(fps).dim() else fps
        rate = batch.get("sample_rate")
        own = torch.arange(size)
        other = own.roll(-1)  # clip i against clip i + 1's video and caption
        for kind, audio in (("", generated), ("_real", real)):
            scores = self.model.scores(audio, video, fps, captions, rate)
            av, text = scores["av"].cpu(), scores["text"].cpu()
            self._add(f"av_align{kind}", av[own, own])
            self._add(f"text_relevance{kind}", text[own, own])
            if size > 1:
                self._add(f"av_align{kind}_shuffled", av[own, other])
                self._add(f"text_relevance{kind}_shuffled", text[own, other])
                self._add(f"av_retrieval{kind}", (av.argmax(1) == own).float())
        if size > 1:
            self._add("av_retrieval_chance", torch.full((size,), 1.0 / size))

    def compute(self) -> dict[str, float]:
        return {name: float(torch.cat(values).mean()) for name, values in self.values.items() if values}


def score_clips(model: AlignmentModel, audio: torch.Tensor, batch: dict[str, Any],
                batch_size: int = 8) -> dict[str, float]:
    """`AudioAlignmentEvaluator`'s figures for audio [N, c, S] (one clip per clip of `batch`: "video", "fps",
    "audio" (real), "text", "sample_rate"), fed in batches of `batch_size` as the test loop does (retrieval and
    the shuffled pairs are among each batch of `batch_size`)."""
    evaluator = AudioAlignmentEvaluator()
    evaluator.model = model
    for s in range(0, len(audio), batch_size):
        part = {k: (v[s : s + batch_size] if isinstance(v, torch.Tensor | list) and len(v) == len(audio) else v)
                for k, v in batch.items()}
        evaluator.update(audio[s : s + batch_size], part, {})
    return evaluator.compute()
