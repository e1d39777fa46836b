"""Training on Ray Train with DeepSpeed (2 CPU workers, gloo), tracked in MLflow, on the tiny model."""

from __future__ import annotations

import random
from pathlib import Path

import mlflow
import numpy as np
import pytest

from components.model import LLM2VecGen
from components.spec import load_spec
from components.tracking import resolve_model
from components.training import (
    Row,
    batch_schedule,
    centered_targets,
    lr_factor,
    mean_target,
    micro_batches,
    retrieval_accuracy,
)
from workflows.train import run_train

WORDS = ["red", "blue", "green", "cats", "dogs", "rain", "snow", "wind"]
ROWS = [
    Row(id=f"{i:03d}", query=f"question {i}: what is {w}?", response=f"{w} is a word",
        teacher=tuple(random.Random(i % 8).gauss(0, 1) for _ in range(64)))
    for i, w in enumerate(WORDS * 2)
]


def spec_for(tmp_path, *overrides):
    return load_spec("specs/tiny.yaml", [
        f"output_dir={tmp_path}", "training.num_workers=2", "training.batch_size=4", "training.micro_batch_size=2",
        "training.max_steps=12", "training.warmup_steps=1", "training.checkpoint_every=4", "training.lr=0.02",
        "tracking.registered_model_name=tiny-embedder", *overrides,
    ])


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


def test_two_worker_deepspeed_run_lowers_loss_and_is_tracked_and_registered(ray_session, tmp_path, monkeypatch):
    # A relative run folder, as in the shipped specs: Ray Train runs workers in their own working directories,
    # and the MLflow store and the model must still land in this folder.
    spec = spec_for(tmp_path, "data.holdout_fraction=0.25", "output_dir=run")
    monkeypatch.chdir(tmp_path)
    result = run_train(spec, ROWS, embedding_dim=64, rows_fingerprint="rows-a")
    assert result["mlflow_tracking_uri"] == f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}"
    assert Path(result["model_dir"]).is_relative_to(tmp_path / "run")

    mlflow.set_tracking_uri(result["mlflow_tracking_uri"])
    client = mlflow.tracking.MlflowClient()
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.params["training.lr"] == "0.02" and run.data.params["tokens.compression"] == "3"
    losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)]
    assert len(losses) == 12
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    for metric in ["reconstruction_loss", "alignment_loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s",
                   "cos_positive", "cos_negative", "cos_student_pairs", "student_norm"]:
        assert metric in run.data.metrics, metric
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"spec.yaml", "model_folder", "decoded"} <= artifacts
    decoded = {a.path for a in client.list_artifacts(run.info.run_id, "decoded")}
    assert decoded == {f"decoded/step_{step:06d}.txt" for step in (4, 8, 12)}
    held_out = client.get_metric_history(run.info.run_id, "holdout_reconstruction_loss")
    assert [m.step for m in held_out] == [0, 4, 8, 12] and all(m.value > 0 for m in held_out)  # 0: the start

    assert result["model_uri"] == "models:/tiny-embedder/1"
    registered = LLM2VecGen.load(resolve_model(result["model_uri"]))
    saved = LLM2VecGen.load(result["model_dir"])
    texts = ["what is rain?", "cats"]
    assert np.array_equal(registered.encode(texts), saved.encode(texts))

    # the same spec again does not train again
    assert run_train(spec, ROWS, embedding_dim=64, rows_fingerprint="rows-a") == result


def test_a_killed_worker_resumes_from_its_checkpoint_with_the_right_step_count(ray_session, tmp_path, monkeypatch):
    marker = tmp_path / "killed-once"
    monkeypatch.setenv("LLM2VEC_GEN_FAIL_AT_STEP", f"6:{marker}")
    # Also runs the quality options through the real loop: centred targets, cosine alignment, own LR for the rows.
    spec = spec_for(tmp_path, "tracking.enabled=false", "training.max_failures=1", "loss.center_targets=true",
                    "loss.alignment_kind=cosine", "training.special_lr_scale=10", "model.reconstruction_init=moments",
                    "model.alignment_init=ridge", "model.init_samples=8", "model.refit_alignment=true")
    result = run_train(spec, ROWS, embedding_dim=64, rows_fingerprint="rows-b")
    assert marker.exists()  # the worker really died at step 6 (after the step-4 checkpoint)
    assert result["steps"] == 12
    # the last checkpoint holds step 12 and only the trained tensors (no backbone weight)
    import torch

    latest = sorted((tmp_path / "ray_train").glob("*/checkpoint_*/state/mp_rank_00_model_states.pt"))[-1]
    state = torch.load(latest, weights_only=False)
    assert state["step"] == 12
    assert set(state["module"]) == {"special_embeddings", "reconstruction.weight", "reconstruction.bias", "alignment.weight", "alignment.bias"}
    assert LLM2VecGen.load(result["model_dir"]).encode("cats").shape == (64,)


def test_batch_order_is_deterministic_grouped_by_length_and_split_across_workers():
    lengths = [random.Random(i).randint(1, 100) for i in range(64)]
    first, again = micro_batches(lengths, 4, seed=0, epoch=0), micro_batches(lengths, 4, seed=0, epoch=0)
    assert first == again and first != micro_batches(lengths, 4, seed=0, epoch=1)
    assert sorted(i for batch in first for i in batch) == list(range(64))
    spread = np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in first])
    assert spread < 25  # random batches of 4 from 1..100 would spread ~60

    spec = load_spec("specs/tiny.yaml", ["training.num_workers=2", "training.batch_size=8", "training.micro_batch_size=2"])
    seen = {rank: [] for rank in (0, 1)}
    for rank in (0, 1):
        for step, _, batch in batch_schedule(lengths, spec.training, rank, 2):
            if step == 4:
                break
            seen[rank] += batch
    assert not set(seen[0]) & set(seen[1])
    assert len(seen[0]) == len(seen[1]) == 4 * 2 * 2


def test_lr_warms_up_then_decays_to_zero_at_the_schedule_end():
    assert lr_factor(0, 10, 100) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100) == pytest.approx(0.5)
    assert lr_factor(100, 10, 100) == pytest.approx(0.0)


def test_holdout_is_a_stable_exact_fraction_chosen_by_id():
    from components.training import split_holdout

    rows = [Row(id=f"{i:04d}", query="q", response="r", teacher=(0.0,)) for i in range(40)]
    train, held = split_holdout(rows, 0.25)
    assert len(held) == 10 and len(train) == 30 and not {r.id for r in train} & {r.id for r in held}
    again_train, again_held = split_holdout(list(reversed(rows)), 0.25)
    assert {r.id for r in again_held} == {r.id for r in held}
    assert split_holdout(rows[:3], 0.01)[1] and split_holdout(rows, 0.0) == (rows, [])


def test_centred_targets_have_zero_training_mean_and_keep_differences():
    rows = [{"id": str(i), "teacher": [float(i), 2.0 * i + 1.0]} for i in range(4)]
    mean = mean_target(rows)
    assert mean == pytest.approx([1.5, 4.0])
    centred = centered_targets(rows, mean)
    assert np.asarray([r["teacher"] for r in centred]).mean(0) == pytest.approx([0.0, 0.0])
    assert centred[3]["teacher"][0] - centred[0]["teacher"][0] == pytest.approx(3.0)
    assert rows[0]["teacher"] == [0.0, 1.0]  # the input rows are not modified


def test_retrieval_accuracy_counts_rows_whose_own_target_is_nearest():
    import torch

    teacher = torch.eye(4)
    assert retrieval_accuracy(teacher * 3, teacher) == 1.0
    # Predicting the same (average) vector for every row finds only one row's target: collapse scores low.
    assert retrieval_accuracy(torch.ones(4, 4), teacher) == 0.25
    swapped = teacher[[1, 0, 2, 3]]
    assert retrieval_accuracy(swapped, teacher) == 0.5


def test_local_store_keeps_artifacts_in_the_run_folder_even_after_the_uri_was_exported(tmp_path, monkeypatch):
    from components.tracking import start_run

    spec = load_spec("specs/tiny.yaml", [f"output_dir={tmp_path / 'run'}", "tracking.experiment=artifacts-here"])
    monkeypatch.chdir(tmp_path)
    # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI: an earlier run in the same process leaves it set.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{(tmp_path / 'run' / 'mlflow.db').resolve()}")
    with start_run(spec, run_name="r"):
        mlflow.log_text("hello", "note.txt")
    assert list((tmp_path / "run" / "mlartifacts").rglob("note.txt"))
    assert not (tmp_path / "mlruns").exists()


def test_latest_checkpoint_is_the_newest_completely_written_one(tmp_path):
    import json

    from workflows.train import COMPLETE, latest_checkpoint

    assert latest_checkpoint(tmp_path) is None
    for name, step, complete in [("checkpoint_a", 4, True), ("checkpoint_b", 8, True), ("checkpoint_c", 12, False)]:
        (tmp_path / name / "state").mkdir(parents=True)
        if complete:
            (tmp_path / name / COMPLETE).write_text(json.dumps({"step": step}))
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint_b"  # c was cut off before it was complete
