"""The workflow on a two-node Ray cluster with its run on S3, all on this machine and all real (tests/servers.py):
moto's S3 server, an `mlflow server` (artifacts on that S3), a head node with no CPUs (as ray_cluster.yaml's) and a
worker node that cannot see the head's /tmp (Ray's per-job copies of the project live there).

Through `ray job submit --working-dir .` of the tiny spec, in this order:
  a. the default (relative) output_dir is refused before any stage, with one line;
  b. output_dir=s3://.../runs: killed (SIGKILL of the driver's process group) once training has a checkpoint on S3,
  c. submitted again: resumes from that checkpoint ("resumed at step N") and runs every stage to the end, every
     generated row present once, nothing under a local runs/, the MLflow run and registered model on the server;
  d. evaluation ran on the worker node (its node id in results.json).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest

from tests.servers import MlflowServer, RayNodes, S3Server, wait_for

pytest.importorskip("moto")
DATA = Path("/work/shared/data") if Path("/work/shared/data").is_dir() else Path("../shared/data").resolve()
NQ = DATA / "nq_open" / "NQ-open.dev.jsonl"
ROOT = Path(__file__).resolve().parent.parent
BUCKET = "llm2vec-runs"
MODEL_NAME = "tiny-on-cluster"
ROWS = 16

pytestmark = pytest.mark.skipif(not NQ.is_file() or shutil.which("unshare") is None or os.geteuid() != 0,
                                reason="needs the test data, unshare and root (a private mount namespace)")


@pytest.fixture(scope="module")
def cluster():
    folder = Path(tempfile.mkdtemp(prefix="i22c", dir="/tmp"))  # short: Ray's socket paths must stay < 108 bytes
    started, parts = time.monotonic(), []
    try:
        s3 = S3Server(folder)
        parts.append(s3)
        s3.create_bucket(BUCKET)
        mlflow = MlflowServer(folder / "mlflow", f"s3://{BUCKET}/mlartifacts", s3.env | {"MLFLOW_S3_ENDPOINT_URL": s3.endpoint})
        parts.append(mlflow)
        nodes = RayNodes(folder)
        parts.append(nodes)
        print(f"cluster up in {time.monotonic() - started:.0f}s")
        yield s3, mlflow, nodes
    finally:
        for part in reversed(parts):
            part.stop()
        shutil.rmtree(folder, ignore_errors=True)


def entrypoint(*extra: str) -> str:
    sets = [f"data.sources[0].path={NQ}", f"data.limit={ROWS}", f"evaluation.data_dir={DATA}",
            "evaluation.tasks=[LocalSTSBenchmark]", "evaluation.limit=16", f"tracking.registered_model_name={MODEL_NAME}",
            # long enough to be killed between checkpoints: a checkpoint every 3 steps
            "training.max_steps=12", "training.checkpoint_every=3", "training.log_every=3",
            "generation.num_actors=1", "generation.shard_size=4"]
    return " ".join(["python -m workflows.run specs/tiny.yaml", *(f"--set '{item}'" for item in sets), *extra])


def test_tiny_spec_on_two_nodes_with_s3_and_an_mlflow_server(cluster):
    s3, mlflow_server, nodes = cluster
    env = s3.env | {"MLFLOW_TRACKING_URI": mlflow_server.uri, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    local_runs = ROOT / "runs"
    before = sorted(local_runs.rglob("*")) if local_runs.exists() else []
    timings: dict[str, float] = {}

    # a. the default output_dir is relative: refused before any stage, in one line that names the fix
    started = time.monotonic()
    job = nodes.submit(entrypoint(), env, ROOT)
    assert nodes.wait(job, 600) == "FAILED"
    logs = nodes.logs_of(job)
    refusal = [line for line in logs.splitlines() if line.startswith("error: output_dir")]
    assert len(refusal) == 1 and "is relative" in refusal[0] and "--output-dir s3://" in refusal[0], logs[-3000:]
    assert "== stage" not in logs
    timings["refusal"] = time.monotonic() - started

    # b. on S3: killed once training has written a checkpoint there
    runs = f"s3://{BUCKET}/runs"
    started = time.monotonic()
    job = nodes.submit(entrypoint("--output-dir", runs), env, ROOT)

    def checkpoint_written() -> bool:
        if nodes.status(job) in ("SUCCEEDED", "FAILED", "STOPPED"):
            raise AssertionError(f"job ended before a checkpoint: {nodes.logs_of(job)[-4000:]}")
        return any(key.endswith("complete.json") and "/ray_train/" in key for key in s3.keys(BUCKET, "runs/"))

    wait_for(checkpoint_written, "a training checkpoint on S3", 900, interval=1)
    pid = nodes.driver_pid(job)
    assert pid, "no driver pid"
    os.killpg(os.getpgid(int(pid)), signal.SIGKILL)  # the driver and its whole process group, as a lost head would
    assert nodes.wait(job, 300) in ("FAILED", "STOPPED")
    killed_logs = nodes.logs_of(job)
    assert "== stage train" in killed_logs and "== stage train done" not in killed_logs, killed_logs[-3000:]
    timings["until_killed"] = time.monotonic() - started

    # c. submitted again: resumes from the checkpoint on S3 and finishes every stage
    started = time.monotonic()
    job = nodes.submit(entrypoint("--output-dir", runs), env, ROOT)
    state = nodes.wait(job, 1200)
    logs = nodes.logs_of(job)
    assert state == "SUCCEEDED", logs[-5000:]
    timings["resumed_run"] = time.monotonic() - started
    assert "generate: cached at s3://" in logs and "teach: cached at s3://" in logs
    resumed = [line for line in logs.splitlines() if "resumed at step" in line]
    assert resumed and int(resumed[0].rsplit(" ", 1)[-1]) >= 3, logs[-5000:]
    assert "train: resuming train-" in logs

    from components.stages import ShardedOutput
    from components.storage import location

    os.environ.update(s3.env)
    generated = [key for key in s3.keys(BUCKET, "runs/generate/") if key.endswith("_SUCCESS.json")]
    assert len(generated) == 1
    ids = ShardedOutput.load(location(f"s3://{BUCKET}/{generated[0].rsplit('/', 1)[0]}")).read(columns=["id"])
    assert sorted(ids.column("id").to_pylist()) == list(range(ROWS))  # every row once
    keys = s3.keys(BUCKET, "runs/")
    assert any("/train/" in key and key.endswith("/model/llm2vec_gen.json") for key in keys)
    assert any("/train_data/" in key and key.endswith("rows.arrow") for key in keys)
    # nothing under the local runs/ (of the project, or of the job's copies on the head)
    assert (sorted(local_runs.rglob("*")) if local_runs.exists() else []) == before
    assert not list(nodes.temp_dir.glob("session_*/runtime_resources/working_dir_files/*/runs"))

    # d. evaluation ran on the worker node, and says so in its results
    reports = [key for key in keys if key.startswith("runs/evaluation/") and key.endswith("results.json")]
    assert len(reports) == 1
    results = json.loads(location(f"s3://{BUCKET}/{reports[0]}").read_text())
    assert results["placement"]["node_id"] == nodes.worker_node_id()
    assert results["placement"]["device"] == "cpu" and "LocalSTSBenchmark" in results["models"]["llm2vec-gen"]

    # MLflow: the run (with its metrics and the evaluation's) and the registered model are on the server, the
    # artifacts on S3
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    experiment = client.get_experiment_by_name("llm2vec-gen-tiny")
    runs_found = client.search_runs([experiment.experiment_id])
    assert len(runs_found) == 1, "the resumed job must continue the killed job's MLflow run"
    assert "eval.llm2vec-gen.LocalSTSBenchmark" in runs_found[0].data.metrics
    versions = client.search_model_versions(f"name='{MODEL_NAME}'")
    assert [version.run_id for version in versions] == [runs_found[0].info.run_id]
    assert any(key.startswith("mlartifacts/") and key.endswith("llm2vec_gen.json") for key in s3.keys(BUCKET, "mlartifacts/"))
    assert not (mlflow_server.uri.startswith("sqlite"))
    print("timings (s):", json.dumps({key: round(value) for key, value in timings.items()}))
