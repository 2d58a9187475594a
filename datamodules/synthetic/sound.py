"""Sound of the shapes world: a short tone at every bounce and collision, pitch chosen by shape.

A tone that starts at time t0 is  a(t) = A sin(2 pi f (t - t0)) e^{-(t - t0)/tau} (1 - e^{-(t - t0)/tau_a})
for t0 <= t < t0 + TONE_SECONDS (tau = 30 ms decay, tau_a = 2 ms attack), with f = PITCH[shape]; a
collision sounds both objects' tones. Outside events the track is silent, so event times can be read back
from the waveform (tests check onsets and pitches).
"""

from __future__ import annotations

import numpy as np

PITCH: dict[str, float] = {"circle": 440.0, "square": 330.0, "triangle": 660.0, "diamond": 550.0, "star": 880.0}
TONE_SECONDS = 0.12
AMPLITUDE = 0.4


def tone(pitch: float, sample_rate: int) -> np.ndarray:
    """One decaying tone (float32 [n]) of TONE_SECONDS at `pitch` Hz."""
    t = np.arange(int(TONE_SECONDS * sample_rate)) / sample_rate
    envelope = np.exp(-t / 0.03) * (1.0 - np.exp(-t / 0.002))
    return (AMPLITUDE * np.sin(2 * np.pi * pitch * t) * envelope).astype(np.float32)


def sonify(events: list[dict], shapes: dict[int, str], duration: float, sample_rate: int) -> np.ndarray:
    """Mono float32 [1, S] track (S = round(duration * sample_rate)) with a tone per object per event."""
    track = np.zeros(int(round(duration * sample_rate)), dtype=np.float32)
    for event in events:
        start = int(round(event["time"] * sample_rate))
        for object_id in event["objects"]:
            sound = tone(PITCH[shapes[object_id]], sample_rate)[: max(0, len(track) - start)]
            track[start : start + len(sound)] += sound
    return np.clip(track, -1.0, 1.0)[None]
