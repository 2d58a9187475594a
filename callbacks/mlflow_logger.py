"""The MLflow logger of every run and its metric naming, shared by the callbacks and the runner.

It lives on the callbacks floor, the lowest that uses it: `callbacks.plots` flushes it before reading the history
back, `callbacks.dp_monitor` names its per-group metrics with `metric_name`, and `experiments.runner` builds it.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from mlflow.entities import Metric

MAX_METRICS_PER_BATCH = 1000  # MLflow's limit per log_batch request


def metric_name(name: str) -> str:
    """MLflow drops characters outside [A-Za-z0-9_/. -]; replace them ourselves (`group=8` -> `group_8`)."""
    return re.sub(r"[^A-Za-z0-9_/. -]", "_", name)


class BufferedMLFlowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger, sending metrics to the store in one batch every `flush_every_s` seconds.

    Every store write costs a few milliseconds of Python (SQLAlchemy) that holds the GIL even when MLflow writes
    from its background thread; logged every 10 steps, that was 8% of a small model's step time. Buffered
    metrics keep their own step and timestamp. The buffer is flushed at every checkpoint and again at the next
    `log_metrics` (Lightning logs a step's metrics after that step's checkpoint), so a run killed after a
    checkpoint has every metric up to it and a resumed run's history has no gap; also when the run ends and on
    `flush()`.

    A resumed run (`run_id` given) replays the steps between its checkpoint and the kill, some of which the
    killed run had already sent. A value equal to the one the store holds for the same metric and step is not
    sent again, so the history has one value per step as an uninterrupted run's has; a different value (a
    resume that is not exact, e.g. after a config change) is sent, and the first one is named on the console.
    Non-finite values (a skipped step's loss) are not sent.

    `resumed_status`: the MLflow status of the run before this job resumed it. When this job fails before it
    sent any new metric (e.g. a resume that cannot start), the run gets that status back instead of FAILED, so
    a finished run is never turned into a failed one by a resume that did nothing.
    """

    def __init__(self, *args: Any, flush_every_s: float = 5.0, resumed_status: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.resumed_status = resumed_status
        self.sent_new = False
        self.flush_every_s = flush_every_s
        self._pending: list[Metric] = []
        self._last_flush = time.monotonic()
        self._stored: dict[tuple[str, int], set[float]] | None = None if kwargs.get("run_id") else {}
        self._warned_divergence = False

    def _stored_values(self) -> dict[tuple[str, int], set[float]]:
        """(metric, step) -> the values the store already holds for this run (read once, when resuming)."""
        if self._stored is None:
            stored: dict[tuple[str, int], set[float]] = {}
            client = self.experiment
            for key in client.get_run(self.run_id).data.metrics:
                for m in client.get_metric_history(self.run_id, key):
                    stored.setdefault((key, m.step), set()).add(m.value)
            self._stored = stored
        return self._stored

    def _is_replay(self, metric: Metric) -> bool:
        values = self._stored_values().get((metric.key, metric.step))
        if not values:
            return False
        if metric.value in values:
            return True
        if not self._warned_divergence:
            self._warned_divergence = True
            print(f"[mlflow] resumed run: {metric.key} at step {metric.step} is {metric.value:.6g}, the killed run "
                  f"logged {sorted(values)[0]:.6g}; both are kept (the resume is not exact)")
        return False

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        timestamp_ms = int(time.time() * 1000)
        new = (Metric(key=metric_name(key), value=float(value), timestamp=timestamp_ms, step=step or 0)
               for key, value in metrics.items())
        # A non-finite value is not sent: MLflow would store inf as 1.8e308, a sentinel that reads as a value.
        self._pending.extend(m for m in new if math.isfinite(m.value) and not self._is_replay(m))
        if time.monotonic() - self._last_flush >= self.flush_every_s:
            self.flush()

    @rank_zero_only
    def flush(self) -> None:
        """Send the buffered metrics to the store (MLflow's async queue when `synchronous=False`)."""
        pending, self._pending = self._pending, []
        self._last_flush = time.monotonic()
        self.sent_new = self.sent_new or bool(pending)
        for start in range(0, len(pending), MAX_METRICS_PER_BATCH):
            self.experiment.log_batch(
                run_id=self.run_id, metrics=pending[start : start + MAX_METRICS_PER_BATCH], **self._log_batch_kwargs
            )

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        self.flush()
        self._last_flush = float("-inf")  # the checkpoint's own step logs next: send it at once too
        super().after_save_checkpoint(checkpoint_callback)

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        if self._initialized:
            self.flush()
        if status == "failed" and self.resumed_status in ("FINISHED", "KILLED") and not self.sent_new:
            if self._initialized:
                self.experiment.set_terminated(self.run_id, self.resumed_status)
            print(f"[mlflow] the resume failed before it logged anything: run {self.run_id} stays "
                  f"{self.resumed_status}")
            return
        super().finalize(status)
