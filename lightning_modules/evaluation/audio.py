"""Audio measures (Movie Gen Audio, §6): reconstruction figures of the audio autoencoder, and synchronisation and
text relevance of generated sound judged against the synthetic world's ground truth (a tone at every bounce and
collision, pitch by shape: `datamodules.synthetic.sound`).

    |X_r|            = |STFT_r(x)|, Hann window, FFT size n_r, hop n_r / 4
    STFT distance    = (1/R) Σ_r [ ‖|X_r| − |Y_r|‖_F / ‖|Y_r|‖_F + mean |log(|X_r| + ε) − log(|Y_r| + ε)| ]
                       (spectral convergence + log-magnitude L1 over R resolutions; x estimate, y reference)
    SI-SDR           = 10 log10(‖α s‖² / ‖α s − ŝ‖²),  α = ⟨ŝ, s⟩ / ‖s‖²   (both zero-mean; Le Roux et al. 2019)

    onsets           RMS envelope e over 10 ms frames with a 5 ms hop; an onset at the first frame of a rise,
                     e(n) ≥ level and e(n) ≥ rise · e(n − lag) (lag 20 ms), at least `min_gap` after the last
    sync             onsets matched one-to-one to the clip's event times within ± tolerance (closest pairs
                     first); over a set of clips: precision = matched / onsets, recall = matched / events,
                     F1 = 2PR / (P + R) (micro-averaged: counts summed over clips)
    pitch relevance  the shapes a caption names vs the shapes whose pitch is nearest the spectral peak of each
                     detected tone (Jaccard of the two sets; text-to-audio relevance in the world)

`SyncEvaluator` reports the sync figures of generated audio beside its ceiling (the real soundtrack) and its
floor (the same generated audio against another clip's events: a video-to-audio model that ignores the video
scores the floor).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from einops import rearrange

from datamodules.synthetic.sound import PITCH
from lightning_modules.evaluation.base import Evaluator
from lightning_modules.nn.text import words

STFT_RESOLUTIONS = ((512, 128), (256, 64), (128, 32))


def stft_magnitude(audio: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    """|STFT| of audio [..., S] (Hann window, centred frames) → [..., n_fft/2 + 1, frames]."""
    flat = rearrange(audio, "... s -> (...) s")
    spec = torch.stft(flat.float(), n_fft, hop, window=torch.hann_window(n_fft, device=audio.device),
                      return_complex=True).abs()
    return spec.reshape(*audio.shape[:-1], *spec.shape[-2:])


def multi_resolution_stft_distance(estimate: torch.Tensor, reference: torch.Tensor,
                                   resolutions: Sequence[tuple[int, int]] = STFT_RESOLUTIONS,
                                   eps: float = 1e-2) -> torch.Tensor:
    """The STFT distance of the module docstring, a scalar (0 for identical signals); differentiable. ε = 1e-2
    floors the log at about −70 dB below a full-scale tone's peak bin, so that silence (most of the world's
    soundtracks) does not dominate the log term with differences far below hearing."""
    if estimate.shape != reference.shape:
        raise ValueError(f"stft distance: shapes differ, {tuple(estimate.shape)} vs {tuple(reference.shape)}")
    total = estimate.new_zeros(())
    for n_fft, hop in resolutions:
        x, y = stft_magnitude(estimate, n_fft, hop), stft_magnitude(reference, n_fft, hop)
        convergence = torch.linalg.vector_norm(x - y) / torch.linalg.vector_norm(y).clamp_min(eps)
        total = total + convergence + (torch.log(x + eps) - torch.log(y + eps)).abs().mean()
    return total / len(resolutions)


def si_sdr(estimate: torch.Tensor, reference: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """SI-SDR in dB per signal: [..., S] pairs → [...] (see the module docstring)."""
    s = reference.float() - reference.float().mean(dim=-1, keepdim=True)
    s_hat = estimate.float() - estimate.float().mean(dim=-1, keepdim=True)
    alpha = (s_hat * s).sum(-1, keepdim=True) / (s.pow(2).sum(-1, keepdim=True) + eps)
    target = alpha * s
    return 10 * torch.log10((target.pow(2).sum(-1) + eps) / ((target - s_hat).pow(2).sum(-1) + eps))


def envelope(audio: torch.Tensor, sample_rate: int, frame: float = 0.010, hop: float = 0.005) -> torch.Tensor:
    """RMS envelope of mono audio [S] over frames of `frame` seconds every `hop` seconds; frame n starts at n·hop."""
    size, step = max(1, round(frame * sample_rate)), max(1, round(hop * sample_rate))
    padded = torch.nn.functional.pad(audio.float().flatten(), (0, size))
    return padded.unfold(0, size, step).pow(2).mean(-1).sqrt()[: max(1, audio.numel() // step)]


def detect_onsets(audio: torch.Tensor, sample_rate: int, level: float = 0.03, rise: float = 2.0,
                  lag: float = 0.02, min_gap: float = 0.05, hop: float = 0.005) -> list[float]:
    """Onset times (seconds) in mono audio [S] or [1, S] (see the module docstring)."""
    if audio.ndim == 2:
        audio = audio.mean(0)
    e = envelope(audio, sample_rate, hop=hop)
    k = max(1, round(lag / hop))
    before = torch.cat([e.new_zeros(k), e[:-k]]) if e.numel() > k else e.new_zeros(e.numel())
    rising = (e >= level) & (e >= rise * before)
    onsets: list[float] = []
    for n in torch.nonzero(rising).flatten().tolist():
        time = n * hop
        if not onsets or time - onsets[-1] >= min_gap:
            onsets.append(time)
    return onsets


def event_times(meta: dict[str, Any], duration: float, start: float = 0.0) -> list[float]:
    """The world's event times (bounces, collisions; json `events`) inside [start, start + duration), relative to
    start, simultaneous events counted once."""
    times = sorted({round(float(e["time"]) - start, 6) for e in meta.get("events", [])})
    return [t for t in times if 0.0 <= t < duration]


def match_counts(onsets: Sequence[float], events: Sequence[float], tolerance: float) -> int:
    """Pairs matched one-to-one with |onset − event| ≤ tolerance, closest pairs first."""
    pairs = sorted((abs(o - e), i, j) for i, o in enumerate(onsets) for j, e in enumerate(events)
                   if abs(o - e) <= tolerance)
    used_onsets, used_events = set(), set()
    for _, i, j in pairs:
        if i not in used_onsets and j not in used_events:
            used_onsets.add(i)
            used_events.add(j)
    return len(used_onsets)


def precision_recall_f1(matched: int, detected: int, events: int) -> dict[str, float]:
    """P = matched / detected, R = matched / events, F1 = 2PR / (P + R) (each 1.0 when its denominator is 0 and
    there is nothing to find, e.g. silence for a clip without events)."""
    precision = matched / detected if detected else float(events == 0)
    recall = matched / events if events else float(detected == 0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


class SyncCounter:
    """Sums matched / detected / event counts over clips (micro-averaged precision, recall, F1)."""

    def __init__(self, tolerance: float = 0.1) -> None:
        self.tolerance = tolerance
        self.matched = self.detected = self.events = 0

    def add(self, onsets: Sequence[float], events: Sequence[float]) -> None:
        self.matched += match_counts(onsets, events, self.tolerance)
        self.detected += len(onsets)
        self.events += len(events)

    def scores(self) -> dict[str, float]:
        return precision_recall_f1(self.matched, self.detected, self.events)


def tone_shapes(audio: torch.Tensor, sample_rate: int, onsets: Sequence[float], window: float = 0.06) -> set[str]:
    """The shapes whose pitch is nearest the spectral peak of the `window` seconds after each onset."""
    audio = audio.mean(0) if audio.ndim == 2 else audio
    names, pitches = list(PITCH), torch.tensor(list(PITCH.values()))
    found = set()
    size = round(window * sample_rate)
    for onset in onsets:
        start = round(onset * sample_rate)
        piece = audio[start : start + size].float()
        if piece.numel() < size // 2:
            continue
        spectrum = torch.fft.rfft(piece * torch.hann_window(piece.numel()), n=8 * size).abs()
        peak = spectrum.argmax().item() * sample_rate / (8 * size)
        found.add(names[int((pitches - peak).abs().argmin())])
    return found


def caption_shapes(caption: str) -> set[str]:
    """The world's shapes named in a caption."""
    named = set(words(caption))
    return {shape for shape in PITCH if shape in named}


def jaccard(a: set[str], b: set[str]) -> float:
    """|a ∩ b| / |a ∪ b| (1.0 for two empty sets)."""
    return len(a & b) / len(a | b) if a | b else 1.0


def spectrogram_image(audio: torch.Tensor, n_fft: int = 256, floor_db: float = -80.0) -> torch.Tensor:
    """Audio [B, C, S] → a grey image [3, B·F, T'] in [-1, 1]: one row of height F = n_fft/2 + 1 per clip (its
    channels averaged), low frequencies at the bottom, log magnitude from `floor_db` to 0 dB (full scale)."""
    spec = stft_magnitude(audio.float().mean(1), n_fft, n_fft // 4) / (n_fft / 4)
    db = (20 * torch.log10(spec.clamp_min(1e-12))).clamp(floor_db, 0.0)
    grey = rearrange(db.flip(1), "b f t -> (b f) t")  # flip: the highest frequency on top of each row
    grey = (grey - floor_db) / -floor_db * 2 - 1
    return grey[None].expand(3, -1, -1)


class SyncEvaluator(Evaluator):
    """Video-to-audio synchronisation and text relevance of generated audio [B, c, S] (see the module docstring).

    Logged: sync_precision, sync_recall, sync_f1 (generated vs the clip's events), sync_f1_real (the real
    soundtrack: the ceiling), sync_f1_shuffled (generated vs the next clip's events: the floor),
    pitch_relevance and pitch_relevance_real (shapes in the caption vs shapes heard).

    Args:
        tolerance: seconds an onset may be from its event.
        sample_rate: of the generated and real audio (default: the batch's "sample_rate").
    """

    def __init__(self, tolerance: float = 0.1, sample_rate: int | None = None) -> None:
        self.tolerance, self.sample_rate = tolerance, sample_rate
        self.start(None, None)

    def start(self, module: Any, trainer: Any) -> None:
        self.counters = {kind: SyncCounter(self.tolerance) for kind in ("generated", "real", "shuffled")}
        self.relevance: dict[str, list[float]] = {"generated": [], "real": []}

    def update(self, generated: torch.Tensor, batch: dict[str, Any], extras: dict[str, torch.Tensor]) -> None:
        rate = int(self.sample_rate or batch["sample_rate"])
        metas = batch.get("meta") or []
        if len(metas) != generated.shape[0]:
            raise ValueError("SyncEvaluator needs the world's json (meta with events) for every clip of the batch")
        duration = generated.shape[-1] / rate
        starts = [float(s) for s in batch["start"]] if batch.get("start") is not None else [0.0] * len(metas)
        events = [event_times(m, duration, start) for m, start in zip(metas, starts)]
        real = batch.get("audio")
        for i, audio in enumerate(generated.detach().cpu()):
            onsets = detect_onsets(audio, rate)
            self.counters["generated"].add(onsets, events[i])
            self.counters["shuffled"].add(onsets, events[(i + 1) % len(events)])
            self.relevance["generated"].append(jaccard(tone_shapes(audio, rate, onsets),
                                                       caption_shapes(batch["text"][i])))
            if real is not None:
                clip = real[i].detach().cpu().float()
                real_onsets = detect_onsets(clip, rate)
                self.counters["real"].add(real_onsets, events[i])
                self.relevance["real"].append(jaccard(tone_shapes(clip, rate, real_onsets),
                                                      caption_shapes(batch["text"][i])))

    def compute(self) -> dict[str, float]:
        scores = self.counters["generated"].scores()
        out = {f"sync_{k}": v for k, v in scores.items()}
        out["sync_f1_shuffled"] = self.counters["shuffled"].scores()["f1"]
        if self.counters["real"].events or self.counters["real"].detected:
            out["sync_f1_real"] = self.counters["real"].scores()["f1"]
        for kind, values in self.relevance.items():
            if values:
                out["pitch_relevance" + ("" if kind == "generated" else "_real")] = sum(values) / len(values)
        return out
