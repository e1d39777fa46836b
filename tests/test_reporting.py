"""Metrics sent to MLflow from a background thread in batches (components/reporting.py)."""

from __future__ import annotations

import threading

import mlflow
import pytest

from components.reporting import MetricsSender


class HeldStore:
    """A client whose first log_batch waits until released: the steps logged meanwhile queue up."""

    def __init__(self, fail: bool = False):
        self.calls: list[list] = []
        self.release, self.entered = threading.Event(), threading.Event()
        self.fail = fail

    def log_batch(self, run_id, metrics, synchronous=True):
        self.entered.set()
        if not self.calls:
            self.release.wait(10)
        self.calls.append(list(metrics))
        if self.fail:
            raise OSError("database is locked")


def test_steps_logged_while_the_store_is_busy_go_in_one_batch_and_flush_waits_for_them():
    store = HeldStore()
    sender = MetricsSender(store, "run", interval=0)
    sender.log({"loss": 1.0}, 1)
    assert store.entered.wait(10)  # the thread is writing step 1
    for step in range(2, 12):  # returns at once while the first write is still held
        sender.log({"loss": float(step), "lr": 0.1, "cos_negative": float("nan")}, step)
    assert len(store.calls) == 0
    store.release.set()
    sender.flush()
    assert len(store.calls) == 2  # the first step alone, then the ten that queued up behind it
    assert [(m.key, m.step) for m in store.calls[1][:3]] == [("loss", 2), ("lr", 2), ("loss", 3)]  # NaN dropped
    assert sum(len(call) for call in store.calls) == 1 + 10 * 2
    sender.close()


def test_a_batch_larger_than_mlflows_limit_is_split():
    store = HeldStore()
    store.release.set()
    sender = MetricsSender(store, "run", max_batch=7, interval=0)
    sender.log({f"m{i}": float(i) for i in range(20)}, 1)
    sender.close()
    assert [len(call) for call in store.calls] == [7, 7, 6]


def test_a_failed_write_is_raised_by_the_next_flush_not_lost():
    store = HeldStore(fail=True)
    store.release.set()
    sender = MetricsSender(store, "run-x", interval=0)
    sender.log({"loss": 1.0}, 1)
    with pytest.raises(RuntimeError, match="writing metrics to run run-x failed: database is locked"):
        sender.flush()
    sender.close()


def test_every_step_reaches_a_real_store(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.tracking.MlflowClient()
    run = client.create_run(client.create_experiment("reporting"))
    sender = MetricsSender(client, run.info.run_id)
    for step in range(1, 31):
        sender.log({"loss": 1.0 / step, "lr": 0.01}, step)
    sender.close()
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
    assert history == [(step, 1.0 / step) for step in range(1, 31)]


def test_writes_are_spaced_by_the_interval_and_a_flush_does_not_wait_for_it():
    store = HeldStore()
    store.release.set()
    sender = MetricsSender(store, "run", interval=60)
    for step in range(1, 21):
        sender.log({"loss": float(step)}, step)
    sender.flush()  # returns long before 60 s: the flush wakes the writer
    assert len(store.calls) == 1 and len(store.calls[0]) == 20  # one write for all twenty steps
    sender.log({"loss": 0.5}, 21)
    sender.close()
    assert len(store.calls) == 2
