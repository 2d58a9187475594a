"""Movie Gen Audio long audio (#19): windows vs extension on clips 3x the window, and continuing a given soundtrack,
without rerunning the whole audio benchmark (`experiments/benchmarks/audio.py`, whose `long_audio` this calls).

    python experiments/benchmarks/audio_extend.py [clips=48] [steps=16] [run_v2a=...] [run_ae=...]

On consecutive triples of the world's held-out 1 s clips joined (3 s, 150 latent frames; windows of 50 overlapping
by 25), audio generated from the video (empty text):
  - triangular / uniform: MultiDiffusion windows fused at every step; extend: `model.long_audio=extend`, segment
    by segment, each continuing the 25 (the last: 50) frames before it; each beside the real joined soundtrack
    (ceiling) and the same mode on another triple's video (floor: the right events, the wrong video);
  - given audio (what `task=sample model.sample.context_audio=<wav>` does): the real first second kept as context
    and the next 2 s generated, by extension and by windows; scored on [1, 3) s only, beside no context at all.
Sync: onsets vs the world's event times (±0.1 s) → precision, recall, F1; STFT distance to the real soundtrack
(for the given-audio rows over the [1, 3) s pieces of all clips joined: a piece of silent real audio alone would
divide by ~0).
Writes experiments/benchmarks/results/audio_extend.json, audio_extend_spectrograms.png (real | windows | extend |
the real first second extended) and prints a table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from experiments.benchmarks.audio import (  # noqa: E402
    LONG_MODES,
    RESULTS,
    generate,
    load_benchmark,
    long_audio,
    spectrogram_figure,
)
from lightning_modules.audio_generation import context_mask  # noqa: E402
from lightning_modules.evaluation.audio import (  # noqa: E402
    SyncCounter,
    detect_onsets,
    event_times,
    multi_resolution_stft_distance,
)


def continue_given(module, batch: dict, events: list[list[float]], steps: int, given_s: float = 1.0,
                   groups: int = 6) -> dict:
    """The first `given_s` seconds of each joined real soundtrack as context ("context_audio" + mask, as task=sample
    builds them), the rest generated from the video with long_audio = extend or windows, or with no context: sync
    and STFT distance on [given_s, end) only."""
    rate, hop = batch["sample_rate"], module.codec.hop
    duration = batch["audio"].shape[-1] / rate
    triples = [list(range(k, k + 3)) for k in range(0, len(events) - 2, 3)][:groups]
    cut = round(given_s * rate)
    saved = module.long_audio, module.sampler.window, module.sampler.overlap, module.sampler.weighting
    out = {}
    try:
        for name, mode, with_context in (("extend", "extend", True), ("windows", "windows", True),
                                         ("no context (windows)", "windows", False)):
            counter, pieces, references = SyncCounter(0.1), [], []
            module.long_audio = mode
            module.sampler.window, module.sampler.overlap, module.sampler.weighting = 50, 25, "triangular"
            for g in triples:
                truth = torch.cat([batch["audio"][i] for i in g], dim=-1)[None]
                joined = {"video": torch.cat([batch["video"][i] for i in g], dim=1)[None],
                          "fps": batch["fps"][g[0]][None], "text": [""]}
                if with_context:
                    given = torch.nn.functional.pad(truth[..., :cut], (0, truth.shape[-1] - cut))
                    joined |= {"context_audio": given, "context_mask": context_mask(cut, truth.shape[-1], hop)[None]}
                audio = generate(module, joined, steps)
                onsets = [t for t in detect_onsets(audio[0], rate) if t >= given_s]
                counter.add(onsets, [t + k * duration for k, i in enumerate(g) for t in events[i]
                                     if t + k * duration >= given_s])
                pieces.append(audio[..., cut:])
                references.append(truth[..., cut:])
            distance = multi_resolution_stft_distance(torch.cat(pieces, -1), torch.cat(references, -1)).item()
            out[name] = {**counter.scores(), "onsets": counter.detected, "events": counter.events,
                         "stft_to_real": distance}
    finally:
        module.long_audio, module.sampler.window, module.sampler.overlap, module.sampler.weighting = saved
    return {"given_seconds": given_s, "scored_seconds": 3 * duration - given_s, **out}


def real_scores(batch: dict, events: list[list[float]], groups: int = 6) -> dict:
    """Sync of the real joined soundtracks (the ceiling)."""
    rate = batch["sample_rate"]
    duration = batch["audio"].shape[-1] / rate
    counter = SyncCounter(0.1)
    for g in [list(range(k, k + 3)) for k in range(0, len(events) - 2, 3)][:groups]:
        truth = torch.cat([batch["audio"][i] for i in g], dim=-1)
        counter.add(detect_onsets(truth, rate), [t + k * duration for k, i in enumerate(g) for t in events[i]])
    return {**counter.scores(), "onsets": counter.detected, "stft_to_real": 0.0}


def figure(module, batch: dict, steps: int, path: Path, triples: int = 3, given_s: float = 1.0) -> Path:
    """Spectrograms of the first `triples` joined clips: real | windows (triangular) | extend | the real first
    `given_s` s continued by extension."""
    rate, hop = batch["sample_rate"], module.codec.hop
    saved = module.long_audio, module.sampler.window, module.sampler.overlap, module.sampler.weighting
    columns: dict[str, list[torch.Tensor]] = {"real": [], "windows": [], "extend": [], "given 1 s, extended": []}
    try:
        module.sampler.window, module.sampler.overlap, module.sampler.weighting = 50, 25, "triangular"
        for k in range(triples):
            g = [3 * k, 3 * k + 1, 3 * k + 2]
            truth = torch.cat([batch["audio"][i] for i in g], dim=-1)[None]
            joined = {"video": torch.cat([batch["video"][i] for i in g], dim=1)[None], "fps": batch["fps"][g[0]][None],
                      "text": [""]}
            cut = round(given_s * rate)
            given = {**joined, "context_audio": torch.nn.functional.pad(truth[..., :cut], (0, truth.shape[-1] - cut)),
                     "context_mask": context_mask(cut, truth.shape[-1], hop)[None]}
            columns["real"].append(truth)
            for name, mode, request in (("windows", "windows", joined), ("extend", "extend", joined),
                                        ("given 1 s, extended", "extend", given)):
                module.long_audio = mode
                columns[name].append(generate(module, request, steps))
    finally:
        module.long_audio, module.sampler.window, module.sampler.overlap, module.sampler.weighting = saved
    return spectrogram_figure({name: torch.cat(audio) for name, audio in columns.items()}, path, scale=1)


def main(argv: list[str]) -> dict:
    options = dict(a.split("=", 1) for a in argv)
    clips, steps = int(options.get("clips", 48)), int(options.get("steps", 16))
    torch.set_num_threads(1)
    module, ema, batch = load_benchmark(options, clips)
    duration = batch["audio"].shape[-1] / batch["sample_rate"]
    events = [event_times(m, duration) for m in batch["meta"]]
    groups = len(events) // 3  # every triple of the clips
    shuffled = {**batch, "video": batch["video"].roll(3, dims=0), "fps": batch["fps"].roll(3, dims=0)}
    results = {
        "clips": len(events), "steps": steps, "ema": ema, "tolerance_s": 0.1,
        "long_audio_3x_window": long_audio(module, batch, events, steps, groups),
        "long_audio_3x_window_shuffled_video": long_audio(module, shuffled, events, steps, groups),
        "real_joined": real_scores(batch, events, groups),
        "given_audio": continue_given(module, batch, events, steps, groups=groups),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "audio_extend.json").write_text(json.dumps(results, indent=1))
    figure(module, batch, steps, RESULTS / "audio_extend_spectrograms.png")

    long, floor = results["long_audio_3x_window"], results["long_audio_3x_window_shuffled_video"]
    print(f"{long['clips']} joined clips of {long['seconds']:g} s (windows of 50 latent frames, overlap 25), "
          f"{steps} midpoint steps, EMA {ema}")
    row = "{:34s} {:>9.3f} {:>7.3f} {:>6.3f} {:>7d} {:>10.3f}"
    print(f"{'audio':34s} {'precision':>9s} {'recall':>7s} {'F1':>6s} {'onsets':>7s} {'STFT':>10s}")
    print(row.format("real joined soundtrack (ceiling)", *(results["real_joined"][k] for k in
                                                         ("precision", "recall", "f1", "onsets", "stft_to_real"))))
    for mode in LONG_MODES:
        for label, table in ((mode, long), (f"{mode}, shuffled video (floor)", floor)):
            s = table[mode]
            print(row.format(label, s["precision"], s["recall"], s["f1"], s["onsets"], s["stft_to_real"]))
    given = results["given_audio"]
    print(f"given: the real first {given['given_seconds']:g} s, scored on the {given['scored_seconds']:g} s after it")
    for name in ("extend", "windows", "no context (windows)"):
        s = given[name]
        print(row.format(name, s["precision"], s["recall"], s["f1"], s["onsets"], s["stft_to_real"]))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
