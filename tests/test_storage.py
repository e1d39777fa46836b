"""components/storage.py against a real S3-compatible server (moto, started here on 127.0.0.1): the Path API the
stages use, a stage output written and resumed on S3, and the refusals of storage that cannot work (one line
naming the URI and the cause, before anything is written)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pytest

from components import storage
from components.stages import ShardedOutput, StageError
from components.storage import RemotePath, StorageError, location
from tests.servers import S3Server, free_port

pytest.importorskip("moto")
BUCKET = "llm2vec-test"


@pytest.fixture(scope="module")
def s3():
    folder = Path(tempfile.mkdtemp(prefix="i22s3"))
    server = S3Server(folder)
    server.create_bucket(BUCKET)
    saved = {key: os.environ.get(key) for key in server.env}
    os.environ.update(server.env)
    storage._FILESYSTEMS.clear()
    yield server
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    storage._FILESYSTEMS.clear()
    server.stop()


@pytest.fixture
def env(monkeypatch):
    """Change an S3 variable for one test; the cached filesystems are rebuilt from the environment."""
    storage._FILESYSTEMS.clear()
    yield monkeypatch
    storage._FILESYSTEMS.clear()


def test_local_paths_stay_paths():
    assert location("runs/tiny") == Path("runs/tiny")
    assert location("/abs/run") == Path("/abs/run")
    assert location("file:///abs/run") == Path("/abs/run")
    assert isinstance(location("s3://bucket/runs"), RemotePath)
    assert isinstance(location("gs://bucket/runs"), RemotePath)


def test_remote_path_api_on_s3(s3):
    root = location(f"s3://{BUCKET}/api")
    assert not root.exists()
    (root / "a" / "x.txt").write_text("hello")
    assert (root / "a" / "x.txt").read_text() == "hello"
    assert (root / "a").is_dir() and (root / "a" / "x.txt").is_file()
    assert [path.name for path in (root / "a").glob("*.txt")] == ["x.txt"]
    assert (root / "a" / "x.txt").parent == root / "a"
    (root / "a" / "x.txt").unlink()
    assert not (root / "a" / "x.txt").exists()
    (root / "a" / "x.txt").unlink(missing_ok=True)
    # pickles as its URI (a Ray worker opens the filesystem itself)
    import pickle

    assert pickle.loads(pickle.dumps(root)) == root


def test_a_stage_output_on_s3_resumes_and_keeps_every_row_once(s3):
    inputs = {"stage": "test", "n": 1}
    output = ShardedOutput.open(location(f"s3://{BUCKET}/runs/stage"), inputs, num_rows=10, shard_size=4)
    table = pa.table({"id": list(range(10)), "value": [i * i for i in range(10)]})
    output.write_shard(0, table.slice(0, 4))
    # a new run (a new object, as after a killed driver) sees the written shard and only misses the others
    again = ShardedOutput.open(location(f"s3://{BUCKET}/runs/stage"), inputs, num_rows=10, shard_size=4)
    assert again.folder == output.folder and again.missing_shards() == [1, 2]
    with pytest.raises(StageError, match="incomplete"):
        again.finish({})
    again.write_shard(1, table.slice(4, 4))
    again.write_shard(2, table.slice(8, 2))
    manifest = again.finish({"stage": "test"})
    assert manifest["rows"] == 10 and again.complete
    assert ShardedOutput.load(str(again.folder)).read().column("value").to_pylist() == [i * i for i in range(10)]
    assert sorted(key.rsplit("/", 1)[-1] for key in s3.keys(BUCKET, "runs/stage/")) == [
        "_SUCCESS.json", "inputs.json", "shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]


def test_staged_copy_is_local_and_cached_by_key(s3, tmp_path, env):
    env.setenv(storage.STAGE_DIR_ENV, str(tmp_path / "stage"))
    source = location(f"s3://{BUCKET}/staged/rows.arrow")
    source.write_bytes(b"0123456789")
    copy = storage.staged(source, "key1")
    assert copy == tmp_path / "stage" / "key1" / "rows.arrow" and copy.read_bytes() == b"0123456789"
    source.write_bytes(b"changed")  # same key, same content by contract: the copy is reused, not fetched again
    assert storage.staged(source, "key1").read_bytes() == b"0123456789"
    storage.drop_staged("key1")
    assert not (tmp_path / "stage" / "key1").exists()
    assert storage.staged(tmp_path / "local.arrow", "key2") == tmp_path / "local.arrow"  # local: used in place


def test_missing_bucket_is_one_line_naming_the_uri(s3):
    with pytest.raises(StorageError) as err:
        storage.check_reachable(location("s3://no-such-bucket-here/runs"))
    assert str(err.value) == "output_dir s3://no-such-bucket-here/runs: the bucket 'no-such-bucket-here' does not exist: create it first"


def test_wrong_credentials_are_one_line_naming_the_uri(s3, env):
    env.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(StorageError) as err:
        storage.check_reachable(location(f"s3://{BUCKET}/runs"))
    assert str(err.value).startswith(f"output_dir s3://{BUCKET}/runs: the credentials were refused")
    assert "\n" not in str(err.value)


def test_unreachable_endpoint_is_one_line_and_quick(s3, env):
    import time

    env.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    started = time.monotonic()
    with pytest.raises(StorageError) as err:
        storage.check_reachable(location(f"s3://{BUCKET}/runs"))
    assert str(err.value).startswith(f"output_dir s3://{BUCKET}/runs: the endpoint is unreachable")
    assert time.monotonic() - started < 30


def test_the_workflow_refuses_a_missing_bucket_before_any_stage(s3, capsys):
    from workflows.run import main

    before = s3.client().list_buckets()["Buckets"]
    assert main(["specs/tiny.yaml", "--output-dir", "s3://missing-bucket-xyz/runs"]) == 2
    err = capsys.readouterr()
    assert err.err.strip() == ("error: output_dir s3://missing-bucket-xyz/runs: the bucket 'missing-bucket-xyz' does "
                               "not exist: create it first")
    assert "== stage" not in err.out
    assert s3.client().list_buckets()["Buckets"] == before


def test_a_relative_output_dir_is_refused_under_a_job_working_dir():
    problem = storage.working_dir_problem(None, Path("runs/tiny"), "gcs://_ray_pkg_abc.zip")
    assert problem.startswith("output_dir runs/tiny is relative") and "--output-dir s3://" in problem
    assert storage.working_dir_problem(None, Path("runs/tiny"), None) is None  # one machine: as before
    assert storage.working_dir_problem("/shared/runs", Path("/shared/runs"), "gcs://x") is None
    assert storage.working_dir_problem("s3://b/r", location("s3://b/r"), "gcs://x") is None


def test_sqlite_tracking_with_a_run_on_s3_is_refused_and_a_server_is_not(s3, env):
    from components.spec import load_spec
    from workflows.run import storage_problem

    env.delenv("MLFLOW_TRACKING_URI", raising=False)
    spec = load_spec("specs/tiny.yaml", [f"output_dir=s3://{BUCKET}/runs"])
    problem = storage_problem(spec, ["generate", "train"])
    assert problem.startswith(f"tracking: output_dir s3://{BUCKET}/runs is not a local folder, so MLflow needs a "
                              "tracking server") and "MLFLOW_TRACKING_URI" in problem
    assert storage_problem(spec, ["generate"]) is None  # nothing is tracked without the train stage
    served = load_spec("specs/tiny.yaml", [f"output_dir=s3://{BUCKET}/runs", "tracking.tracking_uri=http://127.0.0.1:5000"])
    assert storage_problem(served, ["generate", "train"]) is None


def test_teacher_training_with_a_run_on_s3_is_refused(s3):
    from components.spec import load_spec
    from workflows.run import storage_problem

    spec = load_spec("specs/tiny-selfsupervised.yaml", [f"output_dir=s3://{BUCKET}/runs"])
    if spec.teacher.train is None:
        pytest.skip("the self-supervised tiny spec no longer trains its teacher")
    assert storage_problem(spec, ["teacher"]).startswith(f"output_dir s3://{BUCKET}/runs: the teacher stage")


def test_the_train_file_on_s3_is_staged_once_per_node_and_reads_the_same_rows(s3, env, tmp_path):
    from components.spec import load_spec
    from components.train_data import training_data_from_rows
    from components.training import Row

    spec = load_spec("specs/tiny.yaml", [f"output_dir=s3://{BUCKET}/train-file"])
    rows = [Row(id=f"{i:012d}", query=f"question {i}?", response=f"answer {i}", teacher=(float(i), 1.0, 0.5))
            for i in range(20)]
    env.setenv(storage.STAGE_DIR_ENV, str(tmp_path / "driver"))  # the driver's node
    data = training_data_from_rows(spec, rows, "rowsfp")
    assert data.path.startswith(f"s3://{BUCKET}/train-file/train_data/") and data.path.endswith("/rows.arrow")
    assert location(data.path).is_file() and (location(data.path).parent / "meta.json").is_file()
    assert (tmp_path / "driver" / data.key / "rows.arrow").is_file()  # built there: the driver's staged copy
    env.setenv(storage.STAGE_DIR_ENV, str(tmp_path / "worker"))  # another node: stages its own copy
    opened = data.open(spec)
    assert (tmp_path / "worker" / data.key / "rows.arrow").is_file()
    queries, responses, targets = opened.batch(list(range(len(opened))))
    assert sorted(queries) == sorted(row.query for row in rows)
    # the same rows again: found on S3, nothing rebuilt
    again = training_data_from_rows(spec, rows, "rowsfp")
    assert again == data


def test_a_folder_on_s3_is_staged_whole(s3, env, tmp_path):
    env.setenv(storage.STAGE_DIR_ENV, str(tmp_path / "stage"))
    local = tmp_path / "model"
    (local / "sub").mkdir(parents=True)
    (local / "llm2vec_gen.json").write_text("{}")
    (local / "sub" / "weights.bin").write_bytes(b"\x00\x01")
    storage.upload(local, location(f"s3://{BUCKET}/folders/model"))
    copy = storage.staged(f"s3://{BUCKET}/folders/model", "model-key")
    assert copy.name == "model" and (copy / "llm2vec_gen.json").read_text() == "{}"
    assert (copy / "sub" / "weights.bin").read_bytes() == b"\x00\x01"
