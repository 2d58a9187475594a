"""The fair-DP comparison of a sweep: a markdown table and two plots, written to the sweep's parent MLflow run.

    python experiments/run.py -m experiment=dp_digits_unbalanced sweep=dp_methods   # runs it at the end
    python -m experiments.dp_sweep <parent run id> [--tracking-uri URI]               # (re)writes it

Runs are grouped by method (the param dp/method; `none` is the non-private reference) and seed. Per run:
accuracy on groups a and b (fair/test/acc/group_<k>), overall accuracy (test/acc) and epsilon (privacy/epsilon).
Privacy cost and excessive risk gaps are paired by seed with the non-private run of the same seed:

    pi_k(s) = acc_none,s(k) - acc_s(k)      PCG(s) = |pi_a(s) - pi_b(s)|
    R_k(s)  = loss_s(k) - loss_none,s(k)    ERG(s) = |R_a(s) - R_b(s)|

The table gives mean ± sample standard deviation over seeds (accuracies and PCG in percent). Plots: test accuracy
per group (mean over seeds) per method, and the monitor's direction error of groups a and b over training
(fair/direction_error/group_<k>: cos(g_Dk, g_B) - cos(g_Dk, clipped g_B) against the full-training-set gradient
g_Dk of the group, callbacks/dp_monitor.py).
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from experiments import tracking
from experiments.sweep import child_runs

METHOD_ORDER = ("none", "dpsgd", "dpsgd_f", "dpsgd_global", "dpsgd_global_adapt")
METHOD_NAMES = {"none": "non-private", "dpsgd": "DPSGD", "dpsgd_f": "DPSGD-F", "dpsgd_global": "DPSGD-Global",
                "dpsgd_global_adapt": "DPSGD-Global-Adapt"}


@dataclass
class RunRecord:
    run_id: str
    method: str
    seed: int
    metrics: dict[str, float] = field(default_factory=dict)
    lr: float = math.nan

    def acc(self, k: int) -> float:
        return self.metrics.get(f"fair/test/acc/group_{k}", math.nan)

    def loss(self, k: int) -> float:
        return self.metrics.get(f"fair/test/loss/group_{k}", math.nan)


def collect(client: MlflowClient, parent_id: str) -> list[RunRecord]:
    """The finished child runs of a sweep, with their method, seed and final metrics."""
    records = []
    for run in child_runs(client, parent_id):
        if run.info.status != "FINISHED":
            continue
        params = run.data.params
        method = params.get("dp/method", "none")
        seed = int(params.get("seed", run.data.tags.get("seed", 0)))
        lr = float(params.get("model/optimizer/lr", "nan"))
        records.append(RunRecord(run.info.run_id, method, seed, dict(run.data.metrics), lr))
    return records


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    if any(abs(v) > 1e300 for v in values):  # epsilon of a noiseless ablation (MLflow stores inf as the max float)
        return math.inf, 0.0
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def comparison(records: list[RunRecord], a: int, b: int) -> dict[str, dict[str, list[float]]]:
    """method -> column -> per-seed values (acc in percent; gaps paired with the same seed's non-private run)."""
    reference = {r.seed: r for r in records if r.method == "none"}
    table: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in sorted(records, key=lambda r: r.seed):
        row = table[r.method]
        row[f"acc {a}"].append(100 * r.acc(a))
        row[f"acc {b}"].append(100 * r.acc(b))
        row["acc"].append(100 * r.metrics.get("test/acc", math.nan))
        if r.method != "none":  # no guarantee without privacy: the table shows "–", not 0
            row["epsilon"].append(r.metrics.get("privacy/epsilon", math.nan))
        ref = reference.get(r.seed)
        if r.method != "none" and ref is not None:
            cost_a, cost_b = ref.acc(a) - r.acc(a), ref.acc(b) - r.acc(b)
            risk_a, risk_b = r.loss(a) - ref.loss(a), r.loss(b) - ref.loss(b)
            row["PCG"].append(100 * abs(cost_a - cost_b))
            row["ERG"].append(abs(risk_a - risk_b))
    return table


def markdown_table(table: dict[str, dict[str, list[float]]], a: int, b: int) -> str:
    columns = [(f"acc {a} (%)", f"acc {a}"), (f"acc {b} (%)", f"acc {b}"), ("acc (%)", "acc"),
               (f"PCG {a} vs {b} (%)", "PCG"), (f"ERG {a} vs {b}", "ERG"), ("epsilon", "epsilon")]
    lines = ["| method | seeds | " + " | ".join(c for c, _ in columns) + " |", "|---|---|" + "---|" * len(columns)]
    for method in sorted(table, key=lambda m: METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER)):
        row = table[method]
        cells = []
        for _, key in columns:
            mean, std = mean_std(row.get(key, []))
            digits = 3 if key in ("ERG",) else 2 if key == "epsilon" else 1
            cells.append("–" if math.isnan(mean) else "∞" if math.isinf(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}")
        lines.append(f"| {METHOD_NAMES.get(method, method)} | {len(row['acc'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def learning_rates(records: list[RunRecord]) -> tuple[str, dict[str, float]]:
    """The learning-rate choice of a grid sweep (conf/sweep/dp_lr_grid.yaml): validation accuracy (val/acc, the
    balanced validation split, never the test split) per method and rate, mean over seeds, and each method's best
    rate. Utility alone picks the rate, so that the fairness comparison does not tune on its own outcome."""
    scores: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        scores[r.method][r.lr].append(100 * r.metrics.get("val/acc", math.nan))
    rates = sorted({lr for by_lr in scores.values() for lr in by_lr})
    lines = ["| method | " + " | ".join(f"lr {lr:g}" for lr in rates) + " | chosen |", "|---|" + "---|" * (len(rates) + 1)]
    best: dict[str, float] = {}
    for method in _methods(records):
        means = {lr: mean_std(values) for lr, values in scores[method].items()}
        finite = {lr: m for lr, (m, _) in means.items() if not math.isnan(m)}
        if finite:
            best[method] = max(finite, key=finite.get)
        cells = [f"{means[lr][0]:.1f} ± {means[lr][1]:.1f}" if lr in means and not math.isnan(means[lr][0]) else "–"
                 for lr in rates]
        lines.append(f"| {METHOD_NAMES.get(method, method)} | " + " | ".join(cells) + f" | {best.get(method, math.nan):g} |")
    return "\n".join(lines) + "\n", best


def _methods(records: list[RunRecord]) -> list[str]:
    present = {r.method for r in records}
    return [m for m in METHOD_ORDER if m in present] + sorted(present - set(METHOD_ORDER))


def plot_group_accuracy(records: list[RunRecord], path: Path) -> None:
    """Grouped bars: test accuracy of every group, mean over seeds, one bar per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({int(k.rsplit("_", 1)[1]) for r in records for k in r.metrics if k.startswith("fair/test/acc/group_")})
    methods = _methods(records)
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(10, 4))
    for j, method in enumerate(methods):
        means = [mean_std([100 * r.acc(k) for r in records if r.method == method])[0] for k in groups]
        ax.bar([k + (j - (len(methods) - 1) / 2) * width for k in groups], means, width, label=METHOD_NAMES.get(method, method))
    ax.set_xticks(groups)
    ax.set_xlabel("group (digit class)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Per-group test accuracy, mean over seeds")
    ax.legend(fontsize=8, ncol=len(methods))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_direction_error(client: MlflowClient, records: list[RunRecord], groups: tuple[int, int], path: Path, bins: int = 20) -> None:
    """Direction error of each group over training (the monitor's logs, binned in steps, mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(11, 4), sharey=True)
    for ax, k in zip(axes, groups):
        for method in _methods(records):
            points = [(m.step, m.value) for r in records if r.method == method
                      for m in client.get_metric_history(r.run_id, f"fair/direction_error/group_{k}")]
            if not points:
                continue
            last = max(s for s, _ in points) + 1
            binned: dict[int, list[float]] = defaultdict(list)
            for step, value in points:
                binned[int(step * bins / last)].append(value)
            xs = sorted(binned)
            ax.plot([(x + 0.5) * last / bins for x in xs], [statistics.fmean(binned[x]) for x in xs],
                    marker="o", markersize=3, label=METHOD_NAMES.get(method, method))
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_title(f"group {k}")
        ax.set_xlabel("training step")
    axes[0].set_ylabel("cos(g_k, g_B) - cos(g_k, clipped g_B)")
    axes[0].legend(fontsize=8)
    fig.suptitle("Direction error over training (non-private: what DP-SGD clipping would do)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_summary(client: MlflowClient, parent_id: str, compare: tuple[int, int] = (8, 2), out_dir: Path | None = None) -> str:
    """Compute the table and plots of a sweep and log them to its parent run; return the markdown."""
    a, b = compare
    records = collect(client, parent_id)
    if not records:
        text = "no finished child runs\n"
        client.log_text(parent_id, text, "dp_summary.md")
        return text
    text = (f"# Fair DP comparison ({len(records)} runs)\n\nGroups {a} vs {b}; mean ± std over seeds; PCG/ERG paired "
            "by seed with the non-private run.\n\n" + markdown_table(comparison(records, a, b), a, b))
    if any(len({r.lr for r in records if r.method == m}) > 1 for m in _methods(records)):
        table, best = learning_rates(records)
        chosen = " ".join(f"dp_learning_rates.{m}={lr:g}" for m, lr in best.items())
        text += ("\n## Learning rates: validation accuracy (%), mean ± std over seeds\n\n" + table +
                 f"\nChosen by validation accuracy: {chosen}\n")
    client.log_text(parent_id, text, "dp_summary.md")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(out_dir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        plot_group_accuracy(records, folder / "per_group_accuracy.png")
        plot_direction_error(client, records, (a, b), folder / "direction_error.png")
        for name in ("per_group_accuracy.png", "direction_error.png"):
            client.log_artifact(parent_id, str(folder / name), artifact_path="plots")
    return text


class DPSweepSummary(Callback):
    """Hydra callback (conf/sweep/dp_methods.yaml): at the end of the multirun, write the fair-DP summary."""

    def __init__(self, compare: tuple[int, int] | list[int] = (8, 2)) -> None:
        self.compare = (int(compare[0]), int(compare[1]))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        HydraConfig.instance().set_config(config)
        sweep_dir = Path(config.hydra.sweep.dir)
        marker = sweep_dir / tracking.PARENT_RUN_FILE
        if not marker.exists():
            return
        text = write_summary(MlflowClient(config.logger.tracking_uri), marker.read_text().strip(), self.compare, sweep_dir)
        (sweep_dir / "dp_summary.md").write_text(text)
        print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("parent_run_id")
    parser.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI or outputs/mlflow.db")
    parser.add_argument("--compare", type=int, nargs=2, default=(8, 2))
    args = parser.parse_args()
    import os

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(__file__).resolve().parents[1] / 'outputs' / 'mlflow.db'}"
    print(write_summary(MlflowClient(uri), args.parent_run_id, tuple(args.compare)))


if __name__ == "__main__":
    main()
