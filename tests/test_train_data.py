"""The train stage's Arrow file (components/train_data.py): the same rows, order, lengths, split and targets as the
rows in memory gave, the same training step for step, and clear errors for a broken teach output."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from benchmarks._legacy_train_data import LegacyRows
from components.backbone import load_backbone
from components.model import LLM2VecGen
from components.spec import load_spec
from components.stages import ShardedOutput
from components.train_data import TrainingDataError, TrainingFile, prepare_training_data, split_indices
from components.training import mean_target, split_holdout
from workflows.train import rows_from_targets, run_train

WORDS = ["red", "blue", "green", "cats", "dogs", "rain", "snow", "wind", "über", "数字", "<|im_end|>"]
DIMENSION = 24


def teach_table(ids: range, dimension: int = DIMENSION) -> pa.Table:
    rng = np.random.default_rng(ids.start)
    queries = [f"question {i}: what is {' and '.join(random.Random(i).choices(WORDS, k=1 + i % 5))}?" for i in ids]
    # Some answers are empty or blank: the train stage leaves them out.
    responses = ["" if i % 9 == 4 else "  " if i % 13 == 7 else f"{WORDS[i % len(WORDS)]} is a word " * (1 + i % 4)
                 for i in ids]
    vectors = rng.standard_normal((len(ids), dimension)).astype(np.float32)
    return pa.table({
        "id": pa.array(list(ids), pa.int64()), "query": queries, "response": responses,
        "prompt_tokens": pa.array([0] * len(ids), pa.int64()),
        "teacher": pa.array(list(vectors), pa.list_(pa.float32())),
    })


def write_teach_output(folder, num_rows: int = 60, shard_size: int = 16, table=teach_table) -> ShardedOutput:
    output = ShardedOutput.open(folder, {"stage": "teach", "test": True}, num_rows, shard_size)
    for shard in range(output.num_shards):
        output.write_shard(shard, table(output.shard_ids(shard)))
    output.finish({"stage": "teach"})
    return output


def spec_for(tmp_path, *overrides):
    return load_spec("specs/tiny.yaml", [f"output_dir={tmp_path}", *overrides])


def test_the_file_holds_the_rows_in_memory_order_with_their_lengths_split_and_mean(tmp_path):
    output = write_teach_output(tmp_path / "teach")
    spec = spec_for(tmp_path, "data.holdout_fraction=0.2", "loss.center_targets=true", "training.max_response_tokens=12")
    data = prepare_training_data(spec, output.folder)
    old_rows, dimension, fingerprint = rows_from_targets(output.folder)
    assert (data.rows, data.dimension, data.fingerprint) == (len(old_rows), dimension, fingerprint) == (len(old_rows), DIMENSION, output.key)
    assert len(pickle.dumps(data)) < 1000  # what travels to the workers is a path and counts

    file = TrainingFile(data.path)
    ids, queries, responses, vectors = file.rows(range(data.rows))
    assert ids == [row.id for row in old_rows] and queries == [row.query for row in old_rows]
    assert responses == [row.response for row in old_rows]
    assert np.array_equal(vectors, np.asarray([row.teacher for row in old_rows], dtype=np.float32))

    # the held-out split, the lengths of the training rows and the centred targets, as the rows in memory gave them
    old_train, old_holdout = split_holdout(old_rows, spec.data.holdout_fraction)
    train, holdout = split_indices(file.id_hashes(), spec.data.holdout_fraction)
    assert [ids[i] for i in train] == [row.id for row in old_train] and [ids[i] for i in holdout] == [row.id for row in old_holdout]
    model = LLM2VecGen.from_spec(spec, embedding_dim=DIMENSION, backbone=load_backbone(spec.backbone))
    view = data.open(spec, mean=data.train_mean(spec))
    assert view.lengths == model.token_lengths([r.query for r in old_train], [r.response for r in old_train], 12)
    old_dicts = [row.__dict__ | {"teacher": list(row.teacher)} for row in old_train]
    mean = mean_target(old_dicts)
    assert data.train_mean(spec) == mean  # bit for bit
    _, _, targets = view.batch([3, 0, 7])
    assert np.array_equal(np.asarray(targets, np.float32),
                          np.asarray([[v - m for v, m in zip(old_dicts[i]["teacher"], mean, strict=True)] for i in (3, 0, 7)], np.float32))
    assert [row["id"] for row in view.holdout_rows()] == [row.id for row in old_holdout]

    # written once: a second call (a rerun, a sweep's trials) reads the same file
    before = (tmp_path / "train_data").stat().st_mtime_ns, sorted(p.stat().st_mtime_ns for p in (tmp_path / "train_data").rglob("*"))
    assert prepare_training_data(spec, output.folder) == data
    assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "train_data").rglob("*")) == before[1]


def test_held_out_rows_scored_during_training_are_a_bounded_sample(tmp_path):
    output = write_teach_output(tmp_path / "teach", num_rows=200, shard_size=64)
    spec = spec_for(tmp_path, "data.holdout_fraction=0.5", "data.holdout_max_rows=10")
    data = prepare_training_data(spec, output.folder)
    view = data.open(spec)
    held = view.holdout_rows()
    assert len(held) == 10 and [row["id"] for row in held] == sorted(row["id"] for row in held)
    _, all_held = data.split(0.5)
    assert len(all_held) > 80 and len(view) == data.rows - len(all_held)  # the rest of them is still not trained on


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


def losses_by_step(result: dict, name: str) -> list[tuple[int, float]]:
    mlflow.set_tracking_uri(result["mlflow_tracking_uri"])
    history = mlflow.tracking.MlflowClient().get_metric_history(result["mlflow_run_id"], name)
    return sorted((m.step, m.value) for m in history)


def test_training_from_the_file_gives_the_same_losses_step_for_step_as_the_rows_in_memory(ray_session, tmp_path):
    output = write_teach_output(tmp_path / "teach", num_rows=48, shard_size=16)
    overrides = ["training.num_workers=2", "training.batch_size=4", "training.micro_batch_size=2", "training.max_steps=6",
                 "training.checkpoint_every=3", "training.log_every=1", "data.holdout_fraction=0.2",
                 "loss.center_targets=true", "model.alignment_init=ridge", "model.init_samples=8", "training.decode_samples=0"]
    old = run_train(spec_for(tmp_path / "old", *overrides), LegacyRows.from_teach_output(output.folder))
    new_spec = spec_for(tmp_path / "new", *overrides)
    new = run_train(new_spec, prepare_training_data(new_spec, output.folder))
    for metric in ["loss", "reconstruction_loss", "alignment_loss", "holdout_reconstruction_loss", "holdout_alignment_loss"]:
        expected = losses_by_step(old, metric)
        assert len(expected) >= 3, metric
        assert losses_by_step(new, metric) == expected, metric


# ------------------------------------------------------------------------------------------- bad input


def test_vectors_of_different_dimensions_name_the_file_and_the_row(tmp_path):
    def table(ids):
        good = teach_table(ids)
        if 20 not in ids:
            return good
        vectors = good.column("teacher").to_pylist()
        vectors[20 - ids.start] = vectors[20 - ids.start][:-1]
        return good.set_column(good.schema.get_field_index("teacher"), "teacher", pa.array(vectors, pa.list_(pa.float32())))

    output = write_teach_output(tmp_path / "teach", table=table)
    with pytest.raises(TrainingDataError, match=r"shard-00001\.parquet: row 4 \(id 000000000020\): the teacher vector has 23 "
                                                r"dimensions, the first row of the data has 24"):
        prepare_training_data(spec_for(tmp_path), output.folder)


def test_a_null_vector_names_the_file_and_the_row(tmp_path):
    def table(ids):
        good = teach_table(ids)
        vectors = good.column("teacher").to_pylist()
        if 35 in ids:
            vectors[35 - ids.start] = None
        return good.set_column(good.schema.get_field_index("teacher"), "teacher", pa.array(vectors, pa.list_(pa.float32())))

    output = write_teach_output(tmp_path / "teach", table=table)
    with pytest.raises(TrainingDataError, match=r"shard-00002\.parquet: row 3 \(id 000000000035\): the teacher vector has no value"):
        prepare_training_data(spec_for(tmp_path), output.folder)


def test_a_missing_column_names_the_file_and_the_column(tmp_path):
    output = write_teach_output(tmp_path / "teach", table=lambda ids: teach_table(ids).drop_columns(["teacher"]))
    with pytest.raises(TrainingDataError, match=r"shard-00000\.parquet: missing column\(s\) teacher \(has id, query, "
                                                r"response, prompt_tokens\)"):
        prepare_training_data(spec_for(tmp_path), output.folder)


def test_a_truncated_shard_names_the_file(tmp_path):
    output = write_teach_output(tmp_path / "teach")
    path = output.shard_path(2)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(TrainingDataError, match=r"shard-00002\.parquet: not a readable Parquet file .*cut off"):
        prepare_training_data(spec_for(tmp_path), output.folder)
    assert not list((tmp_path / "train_data").rglob("rows.arrow"))  # nothing half-written is left to be reused


def test_a_teach_output_with_only_empty_answers_is_an_error(tmp_path):
    def table(ids):
        good = teach_table(ids)
        return good.set_column(good.schema.get_field_index("response"), "response", pa.array([" "] * len(ids)))

    output = write_teach_output(tmp_path / "teach", num_rows=20, table=table)
    with pytest.raises(TrainingDataError, match="no rows with a non-empty response"):
        prepare_training_data(spec_for(tmp_path), output.folder)
    assert pq.read_table(output.shard_path(0)).num_rows == 16  # the input is untouched


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RssFile from /proc (Linux)")
def test_reading_every_row_does_not_keep_the_file_in_the_workers_rss(tmp_path):
    output = write_teach_output(tmp_path / "teach", num_rows=2048, shard_size=1024,
                                table=lambda ids: teach_table(ids, dimension=4096))  # 32 MiB of vectors
    spec = spec_for(tmp_path)
    data = prepare_training_data(spec, output.folder)

    def mapped_kib() -> int:
        return int(next(line.split()[1] for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("RssFile")))

    file = TrainingFile(data.path)
    before, total = mapped_kib(), 0.0
    for start in range(0, len(file), 8):
        total += float(file.rows(range(start, min(start + 8, len(file))))[3].sum())
    assert mapped_kib() - before < 12 * 1024  # without the releases: + 32 MiB
    _, _, _, everything = TrainingFile(data.path).rows(range(len(file)))
    assert total == pytest.approx(float(everything.sum()), rel=1e-4)  # and the rows read are the file's rows
