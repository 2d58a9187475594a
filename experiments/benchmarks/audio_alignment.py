"""The learned audio-video alignment and text-relevance judge of Movie Gen Audio (#19 item 5) on real clips: how far
it separates a clip's own soundtrack (the ceiling of `av_align`, `text_relevance`) from another clip's video and
caption (the floor), from its own soundtrack shifted in time, and how little it cares about loudness.

    python experiments/benchmarks/audio_alignment.py [clips=64] [batch=8] [name=audio_alignment] [overrides ...]
    python experiments/benchmarks/audio_alignment.py data/world=default name=audio_alignment_default_world

Trains the judge on the training split of the world of `experiment=audio_v2a` (or loads it from its cache, the
`model.evaluators.alignment.cache_dir`), then scores the first `clips` held-out clips in batches of `batch` (the
test loop's). Writes experiments/benchmarks/results/<name>.json, a figure of where in time the judge finds
audio and video agreeing (<name>_timeline.png: per-frame shares of av_align for the real soundtrack and
for it 0.25 s late, the world's event times marked), and prints a table.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from experiments.compose import compose_config  # noqa: E402
from lightning_modules.evaluation.audio import event_times  # noqa: E402
from lightning_modules.evaluation.audio_alignment import alignment_from_datamodule, score_clips  # noqa: E402

RESULTS = ROOT / "experiments" / "benchmarks" / "results"


def held_out_clips(datamodule, clips: int) -> dict:
    """The first `clips` validation clips as one batch (video, fps, audio, text, sample_rate)."""
    out: dict = {"video": [], "audio": [], "text": [], "fps": [], "meta": []}
    for batch in datamodule.val_dataloader():
        for i in range(len(batch["text"])):
            if len(out["text"]) < clips:
                out["video"].append(batch["video"][i])
                out["audio"].append(batch["audio"][i].float())
                out["text"].append(batch["text"][i])
                out["meta"].append(batch["meta"][i])
                out["fps"].append(torch.as_tensor(batch["fps"]).flatten()[i])
        if len(out["text"]) >= clips:
            break
    return {"video": torch.stack(out["video"]), "audio": torch.stack(out["audio"]), "text": out["text"],
            "fps": torch.stack(out["fps"]), "meta": out["meta"], "sample_rate": int(batch["sample_rate"])}


def timeline_figure(judge, batch: dict, path: Path, count: int = 6) -> Path:
    """Per-frame shares of av(real, video) for the first `count` clips with events, beside the same soundtrack
    0.25 s late; the world's event times as grey lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rate = batch["sample_rate"]
    duration = batch["audio"].shape[-1] / rate
    chosen = [i for i, m in enumerate(batch["meta"]) if event_times(m, duration)][:count]
    video, fps, real = batch["video"][chosen], batch["fps"][chosen], batch["audio"][chosen]
    shares = {"real soundtrack": judge.frame_scores(real, video, fps, rate),
              "the same, 0.25 s late": judge.frame_scores(real.roll(rate // 4, dims=-1), video, fps, rate)}
    n = shares["real soundtrack"].shape[1]
    times = (torch.arange(n) + 0.5) / judge.config.rate
    figure, axes = plt.subplots(2, (len(chosen) + 1) // 2, figsize=(4 * ((len(chosen) + 1) // 2), 5.5),
                                sharey=True, squeeze=False)
    for k, (ax, i) in enumerate(zip(axes.flat, chosen)):
        for t in event_times(batch["meta"][i], duration):
            ax.axvline(t, color="0.7", lw=3)
        for (name, values), style in zip(shares.items(), ("-", "--")):
            ax.plot(times, values[k], style, label=f"{name}: {float(values[k].sum()):.2f}")
        ax.set_title(batch["text"][i][:48], fontsize=7)
        ax.set_xlabel("s")
        ax.legend(fontsize=7)
    figure.suptitle("share of av_align per aligned frame (40 ms); grey: the world's events")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def main(argv: list[str]) -> dict:
    options = dict(a.split("=", 1) for a in argv if "=" in a and not a.startswith(("data", "model", "+", "~")))
    overrides = [a for a in argv if a.startswith(("data", "model", "+", "~"))]
    clips, batch_size = int(options.get("clips", 64)), int(options.get("batch", 8))
    torch.set_num_threads(1)
    cfg = compose_config([f"experiment={options.get('experiment', 'audio_v2a')}", "model.codec.checkpoint=null",
                          "data.val_batches=null", *overrides], Path("/tmp") / "audio_alignment_benchmark")
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="object")
    datamodule.prepare_data()
    evaluator = hydra.utils.instantiate(cfg.model.evaluators.alignment, _convert_="object")
    start = time.perf_counter()
    judge = alignment_from_datamodule(datamodule, evaluator.config, evaluator.cache_dir)
    seconds = time.perf_counter() - start
    datamodule.setup("validate")
    batch = held_out_clips(datamodule, clips)
    real, rate = batch["audio"], batch["sample_rate"]
    sets = {
        "real soundtrack": real,
        "real, 0.25 s late": real.roll(rate // 4, dims=-1),
        "real, 0.5 s late": real.roll(rate // 2, dims=-1),
        "real at 1/4 gain": real / 4,
        "silence": torch.zeros_like(real),
    }
    scores = {name: score_clips(judge, audio, batch, batch_size) for name, audio in sets.items()}
    results = {"clips": len(batch["text"]), "batch": batch_size, "seconds": real.shape[-1] / rate,
               "world": OmegaConf.to_container(cfg.data.world, resolve=True), "judge": {**evaluator.config.__dict__, "cache_dir": evaluator.cache_dir},
               "judge_seconds": seconds, "scores": scores}
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = options.get("name", "audio_alignment")
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=1))
    timeline_figure(judge, batch, RESULTS / f"{name}_timeline.png")

    print(f"{results['clips']} held-out clips of {results['seconds']:g} s in batches of {batch_size} "
          f"(retrieval chance {scores['real soundtrack'].get('av_retrieval_chance', float('nan')):.3f}); judge "
          f"ready in {seconds:.0f} s")
    print(f"{'audio':20s} {'av_align':>9s} {'other video':>11s} {'retrieval':>9s} {'text_rel':>9s} "
          f"{'other caption':>13s}")
    for name, s in scores.items():
        print(f"{name:20s} {s['av_align']:9.3f} {s['av_align_shuffled']:11.3f} {s['av_retrieval']:9.3f} "
              f"{s['text_relevance']:9.3f} {s['text_relevance_shuffled']:13.3f}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
