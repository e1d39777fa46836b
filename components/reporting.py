"""Metrics sent to MLflow off the training loop's thread, in batches.

One `mlflow.log_metrics` call against the local SQLite store takes about a second (measured on the tiny spec:
40 steps at log_every 1 spent ~45 s in it, against ~1 s of compute). The loop hands each step's metrics to
`MetricsSender.log`, which only queues them; a background thread writes whatever has queued up, at most once every
`interval` seconds, in one `MlflowClient.log_batch` call (at most 1,000 metrics each, MLflow's limit), so a slow
store delays the metrics, never the steps. `flush()` waits until everything queued is written (the loop calls it at checkpoints, so that a
checkpoint never records a step whose metrics are not in the store) and `close()` flushes and stops the thread
(at the end and on failure). A write that fails is raised by the next flush or close, not lost silently.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

MAX_BATCH = 1000  # MLflow's limit on metrics per log_batch call
_STOP = object()


class MetricsSender:
    def __init__(self, client: Any, run_id: str, max_batch: int = MAX_BATCH, interval: float = 5.0):
        self.client, self.run_id, self.max_batch, self.interval = client, run_id, max_batch, interval
        self._queue: queue.Queue = queue.Queue()
        self._wake = threading.Event()  # set by flush and close: write what is queued now
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="mlflow-metrics", daemon=True)
        self._thread.start()

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Queue one step's metrics (NaN values are dropped, as MLflow's UI cannot plot them)."""
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self._queue.put([Metric(key, float(value), stamp, step) for key, value in metrics.items() if value == value])

    def flush(self) -> None:
        """Block until every queued metric is written; raise the first failed write, if any."""
        self._wake.set()
        self._queue.join()
        self._raise()

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._wake.set()
            self._thread.join()
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"MLflow: writing metrics to run {self.run_id} failed: {error}") from error

    def _run(self) -> None:
        while True:
            items = [self._queue.get()]
            # At most one write per `interval` seconds, whatever log_every is: each costs the store's CPU time
            # (about a second with SQLite), taken from the training thread on a small machine.
            self._wake.wait(self.interval)
            self._wake.clear()
            while True:  # everything that queued up while the last write ran goes into this one
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            metrics = [metric for item in items if item is not _STOP for metric in item]
            try:
                for start in range(0, len(metrics), self.max_batch):
                    self.client.log_batch(self.run_id, metrics=metrics[start : start + self.max_batch], synchronous=True)
            except Exception as err:  # kept for flush/close to raise in the loop's thread
                log.warning("MLflow: writing %d metrics failed: %s", len(metrics), err)
                self._error = self._error or err
            finally:
                for _ in items:
                    self._queue.task_done()
            if any(item is _STOP for item in items):
                return
