"""Movie Gen Audio benchmark (#19): the audio autoencoder's reconstruction, video-to-audio sync beside its floor and
ceiling, text relevance, triangular vs uniform windows on a clip 3x the window, spectrograms and a muxed mp4.

Reads the newest finished runs of `experiment=audio_ae` and `experiment=audio_v2a` (or run_ae= / run_v2a=):

    python experiments/run.py experiment=audio_ae && python experiments/run.py experiment=audio_v2a
    python experiments/benchmarks/audio.py [clips=32] [steps=16]

On the world's held-out clips (the first `clips` val clips of 1 s at 16 fps, audio at 8 kHz):
  - autoencoder: STFT distance and SI-SDR of the reconstruction beside another clip's audio (floor); sync F1 of
    the reconstruction (the codec's ceiling for any generator over its latents);
  - V2A: sync precision / recall / F1 (onsets vs the world's bounce times, +-0.1 s) of audio generated from the
    clip's video, from a shuffled clip's video (floor: the same events, the wrong video), with the video dropped
    (T2A), and of the real soundtrack (ceiling); pitch relevance (shapes in the caption vs shapes heard);
  - the learned judge (`evaluation/audio_alignment.py`, trained once per world and cached) on every audio set:
    av_align with the clip's video and with another clip's (floor), audio-to-video retrieval among batches of 8
    (chance 1/8), text relevance to the clip's caption and to another's (`alignment`);
  - long audio: three clips' videos joined (3 s, 150 latent frames = 3 windows of 50) generated with windows of 50
    latent frames overlapping by 25, triangular vs uniform weights, and by extension (`model.long_audio=extend`:
    segment by segment, each continuing the previous 25 frames): sync F1 and the STFT distance to the real
    joined soundtrack (`long_audio`; `experiments/benchmarks/audio_extend.py` runs only this part);
  - a figure (spectrograms: real | reconstruction | V2A | shuffled-video) and a sample mp4 with its generated
    soundtrack, under experiments/benchmarks/results/.
Writes experiments/benchmarks/results/audio.json and prints a table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from datamodules.media import write_video  # noqa: E402
from experiments.compose import compose_config  # noqa: E402
from experiments.quickstart_grid import load_run, run_checkpoint  # noqa: E402
from lightning_modules.evaluation.audio import (  # noqa: E402
    SyncCounter,
    caption_shapes,
    detect_onsets,
    event_times,
    jaccard,
    multi_resolution_stft_distance,
    si_sdr,
    spectrogram_image,
    tone_shapes,
)
from lightning_modules.evaluation.audio_alignment import alignment_from_datamodule, score_clips  # noqa: E402

RESULTS = ROOT / "experiments" / "benchmarks" / "results"


def sync_of(counter: SyncCounter, audio: torch.Tensor, events: list[list[float]], rate: int,
            relevance: list[float] | None = None, captions: list[str] | None = None) -> None:
    for i, clip in enumerate(audio):
        onsets = detect_onsets(clip, rate)
        counter.add(onsets, events[i])
        if relevance is not None:
            relevance.append(jaccard(tone_shapes(clip, rate, onsets), caption_shapes(captions[i])))


def gather_clips(module, datamodule_batches, clips: int) -> dict:
    """The first `clips` held-out clips (video, fps, audio, text, meta) of equal length."""
    out: dict = {"video": [], "audio": [], "text": [], "meta": [], "fps": []}
    for batch in datamodule_batches:
        for i in range(len(batch["text"])):
            if len(out["text"]) >= clips:
                break
            for key in out:
                value = batch[key][i] if key != "fps" else torch.as_tensor(batch["fps"]).flatten()[i]
                out[key].append(value)
    return {"video": torch.stack(out["video"]), "audio": torch.stack(out["audio"]).float(), "text": out["text"],
            "meta": out["meta"], "fps": torch.stack(out["fps"]), "sample_rate": module.codec.sample_rate}


def generate(module, batch: dict, steps: int, chunk: int = 8, **kwargs) -> torch.Tensor:
    pieces = []
    for s in range(0, len(batch["text"]), chunk):
        part = {k: (v[s : s + chunk] if isinstance(v, torch.Tensor | list) else v) for k, v in batch.items()}
        samples = part["audio"].shape[-1] if "audio" in part else module.pixel_shape(part)[0]
        part.pop("audio", None)
        pieces.append(module.generate(part, samples, 1, 1, steps=steps, seed=s, **kwargs))
    return torch.cat(pieces)


def spectrogram_figure(rows: dict[str, torch.Tensor], path: Path, scale: int = 2) -> Path:
    """Columns = the named audio sets [N, 1, S], one row per clip; grey spectrograms with a header."""
    columns = []
    for name, audio in rows.items():
        image = ((spectrogram_image(audio)[0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        image = image.repeat(scale, 0).repeat(scale, 1)
        head = Image.new("L", (image.shape[1], 14), 255)
        ImageDraw.Draw(head).text((2, 1), name, fill=0)
        columns.append(np.concatenate([np.asarray(head), image], axis=0))
        columns.append(np.full((columns[-1].shape[0], 8), 255, np.uint8))
    Image.fromarray(np.concatenate(columns[:-1], axis=1)).save(path)
    return path


# long-audio modes: name -> (model.long_audio, sampler.weighting)
LONG_MODES = {"triangular": ("windows", "triangular"), "uniform": ("windows", "uniform"),
              "extend": ("extend", "triangular")}


def long_audio(module, batch: dict, events: list[list[float]], steps: int, groups: int = 6,
               modes: dict[str, tuple[str, str]] = LONG_MODES) -> dict:
    """Consecutive triples of the batch's 1 s clips joined (3 s, 150 latent frames) and generated from their video
    (empty text) with windows of 50 latent frames overlapping by 25, in each of `modes`: sync scores against the
    joined events and the mean STFT distance to the joined real soundtrack."""
    n, rate = len(events), batch["sample_rate"]
    duration = batch["audio"].shape[-1] / rate
    triples = [list(range(k, k + 3)) for k in range(0, n - 2, 3)][:groups]
    saved = module.long_audio, module.sampler.window, module.sampler.overlap, module.sampler.weighting
    out = {}
    try:
        for name, (mode, weighting) in modes.items():
            counter, distances = SyncCounter(0.1), []
            module.long_audio = mode
            module.sampler.window, module.sampler.overlap, module.sampler.weighting = 50, 25, weighting
            for g in triples:
                joined = {"video": torch.cat([batch["video"][i] for i in g], dim=1)[None],
                          "fps": batch["fps"][g[0]][None], "text": [""]}
                audio = generate(module, joined, steps)
                truth = torch.cat([batch["audio"][i] for i in g], dim=-1)[None]
                joined_events = [t + k * duration for k, i in enumerate(g) for t in events[i]]
                counter.add(detect_onsets(audio[0], rate), joined_events)
                distances.append(multi_resolution_stft_distance(audio, truth).item())
            out[name] = {**counter.scores(), "onsets": counter.detected, "stft_to_real": float(np.mean(distances))}
    finally:
        module.long_audio, module.sampler.window, module.sampler.overlap, module.sampler.weighting = saved
    return {"clips": len(triples), "seconds": 3 * duration, "window_latent_frames": 50, "overlap": 25, **out}


def load_benchmark(options: dict[str, str], clips: int) -> tuple:
    """(module with the audio_v2a run's (EMA) weights over the audio_ae run's codec, EMA or not, the first `clips`
    held-out clips of 1 s) for the newest runs, or run_ae= / run_v2a=."""
    ae_ckpt, _ = run_checkpoint(options.get("run_ae", str(ROOT / "outputs" / "audio_ae")))
    v2a_ckpt, overrides = run_checkpoint(options.get("run_v2a", str(ROOT / "outputs" / "audio_v2a")))
    overrides = [o for o in overrides if not o.startswith("model.codec.checkpoint")] + \
        [f"model.codec.checkpoint={ae_ckpt}", "data.val_batches=null"]
    module, ema, _, _ = load_run(v2a_ckpt, overrides, "audio_benchmark")
    cfg = compose_config(overrides + ["data.frames=[16]", "data.batch_size=16"], Path("/tmp") / "audio_benchmark_data")
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="object")
    datamodule.prepare_data()
    datamodule.setup("validate")
    return module, ema, gather_clips(module, iter(datamodule.val_dataloader()), clips)


def alignment_judge(options: dict[str, str]):
    """The learned audio-video / audio-text judge (`model.evaluators.alignment`) of the audio_v2a run's world, trained
    once on its training clips and cached (the test loop's judge)."""
    _, overrides = run_checkpoint(options.get("run_v2a", str(ROOT / "outputs" / "audio_v2a")))
    overrides = [o for o in overrides if not o.startswith("model.codec.checkpoint")] + ["model.codec.checkpoint=null"]
    cfg = compose_config(overrides, Path("/tmp") / "audio_benchmark_judge")
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="object")
    datamodule.prepare_data()
    evaluator = hydra.utils.instantiate(cfg.model.evaluators.alignment, _convert_="object")
    return alignment_from_datamodule(datamodule, evaluator.config, evaluator.cache_dir)


def main(argv: list[str]) -> dict:
    options = dict(a.split("=", 1) for a in argv)
    clips, steps = int(options.get("clips", 32)), int(options.get("steps", 16))
    torch.set_num_threads(1)
    module, ema, batch = load_benchmark(options, clips)
    rate = batch["sample_rate"]
    duration = batch["audio"].shape[-1] / rate
    events = [event_times(m, duration) for m in batch["meta"]]
    n = len(events)
    results: dict = {"clips": n, "seconds": duration, "steps": steps, "ema": ema, "tolerance_s": 0.1,
                     "events": sum(len(e) for e in events)}

    # -- the autoencoder -------------------------------------------------------------------------------------------
    real = batch["audio"]
    with torch.no_grad():
        reconstruction = module.codec.decode(module.codec.encode(real), real.shape[-1])
    shuffled_audio = real.roll(1, dims=0)
    results["autoencoder"] = {
        "stft": multi_resolution_stft_distance(reconstruction, real).item(),
        "stft_shuffled_floor": multi_resolution_stft_distance(shuffled_audio, real).item(),
        "si_sdr_db": si_sdr(reconstruction, real).mean().item(),
        "si_sdr_shuffled_floor_db": si_sdr(shuffled_audio, real).mean().item(),
        "peak_real": real.abs().amax().item(), "peak_reconstruction": reconstruction.abs().amax().item(),
    }

    # -- sync: V2A, shuffled video, T2A, TV2A, real, reconstruction ------------------------------------------------------
    shuffled = {**batch, "video": batch["video"].roll(1, dims=0), "fps": batch["fps"].roll(1, dims=0)}
    no_text = {**batch, "text": [""] * n}
    audio_sets = {
        "v2a": generate(module, no_text, steps),
        "tv2a": generate(module, batch, steps),
        "v2a_shuffled_video": generate(module, {**shuffled, "text": [""] * n}, steps),
        "t2a": generate(module, {k: v for k, v in batch.items() if k not in ("video",)}, steps,
                        guidance_scales={}),
        "real": real,
        "reconstruction": reconstruction,
    }
    # diagnostic: each clip scaled to the real soundtracks' peak level (0.31), so that onsets are found in audio
    # whose timing is right but whose level is far too low (a short-trained decoder); noise becomes onsets too
    peak = float(real.abs().amax())
    for name in ("reconstruction", "v2a", "v2a_shuffled_video"):
        audio = audio_sets[name]
        audio_sets[f"{name}_peak_normalised"] = audio / audio.abs().amax(-1, keepdim=True).clamp_min(1e-8) * peak
    sync = {}
    for name, audio in audio_sets.items():
        counter, relevance = SyncCounter(0.1), []
        sync_of(counter, audio, events, rate, relevance, batch["text"])
        sync[name] = {**counter.scores(), "pitch_relevance": float(np.mean(relevance)),
                      "onsets": counter.detected}
    results["sync"] = sync

    # -- the learned judge: audio-video alignment and text relevance (ImageBind / CLAP stand-ins), batches of 8 -------
    judge = alignment_judge(options)
    results["alignment"] = {name: score_clips(judge, audio, batch, batch_size=8) for name, audio in audio_sets.items()
                            if not name.endswith("_peak_normalised")}

    # -- long audio: 3 clips joined, windows of 50 latent frames; fused (triangular, uniform) or extended ------------------
    results["long_audio_3x_window"] = long = long_audio(module, batch, events, steps)

    # -- figures ---------------------------------------------------------------------------------------------------------
    RESULTS.mkdir(parents=True, exist_ok=True)
    show = slice(0, 4)
    spectrogram_figure({"real": real[show], "AE reconstruction": reconstruction[show], "V2A": audio_sets["v2a"][show],
                        "V2A, shuffled video": audio_sets["v2a_shuffled_video"][show]},
                       RESULTS / "audio_spectrograms.png")
    write_video(RESULTS / "audio_v2a_sample.mp4", batch["video"][0], float(batch["fps"][0]),
                audio=audio_sets["v2a"][0], sample_rate=rate)
    (RESULTS / "audio.json").write_text(json.dumps(results, indent=1))

    print(f"{n} held-out clips of {duration:g} s, {results['events']} events, {steps} midpoint steps, EMA {ema}")
    ae = results["autoencoder"]
    print(f"autoencoder  STFT {ae['stft']:.3f} (another clip: {ae['stft_shuffled_floor']:.3f})  SI-SDR "
          f"{ae['si_sdr_db']:.1f} dB (another clip: {ae['si_sdr_shuffled_floor_db']:.1f} dB)")
    print(f"peak level: real {ae['peak_real']:.3f}, reconstruction {ae['peak_reconstruction']:.4f}")
    print(f"{'audio':34s} {'precision':>9s} {'recall':>7s} {'F1':>6s} {'onsets':>7s} {'pitch rel.':>10s}")
    for name, s in sync.items():
        print(f"{name:34s} {s['precision']:9.3f} {s['recall']:7.3f} {s['f1']:6.3f} {s['onsets']:7d} "
              f"{s['pitch_relevance']:10.3f}")
    print(f"{'audio (learned judge, batches of 8)':34s} {'av_align':>8s} {'other video':>11s} {'retrieval':>9s} "
          f"{'text_rel':>8s} {'other caption':>13s}")
    for name, s in results["alignment"].items():
        print(f"{name:34s} {s['av_align']:8.3f} {s['av_align_shuffled']:11.3f} {s['av_retrieval']:9.3f} "
              f"{s['text_relevance']:8.3f} {s['text_relevance_shuffled']:13.3f}")
    for mode in LONG_MODES:
        s = long[mode]
        print(f"3x window, {mode:10s} F1 {s['f1']:.3f}  STFT to real {s['stft_to_real']:.3f}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
