"""The MLflow logger of every run and its metric naming, shared by the callbacks and the runner.

It lives on the callbacks floor, the lowest that uses it: `callbacks.plots` flushes it before reading the history
back, `callbacks.dp_monitor` names its per-group metrics with `metric_name`, and `experiments.runner` builds it.
"""

from __future__ import annotations

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
    """

    def __init__(self, *args: Any, flush_every_s: float = 5.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.flush_every_s = flush_every_s
        self._pending: list[Metric] = []
        self._last_flush = time.monotonic()

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        timestamp_ms = int(time.time() * 1000)
        self._pending.extend(
            Metric(key=metric_name(key), value=float(value), timestamp=timestamp_ms, step=step or 0)
            for key, value in metrics.items()
        )
        if time.monotonic() - self._last_flush >= self.flush_every_s:
            self.flush()

    @rank_zero_only
    def flush(self) -> None:
        """Send the buffered metrics to the store (MLflow's async queue when `synchronous=False`)."""
        pending, self._pending = self._pending, []
        self._last_flush = time.monotonic()
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
        super().finalize(status)
