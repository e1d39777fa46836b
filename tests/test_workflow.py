"""The workflow end to end: `ray job submit` of workflows.run on a local head, and a tiny Ray Tune sweep."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pytest
import yaml

from components.model import LLM2VecGen
from components.spec import load_spec
from tests.servers import stop_group

DATA = Path("../shared/data").resolve()
NQ = DATA / "nq_open" / "NQ-open.dev.jsonl"
VENV_BIN = str(Path(sys.executable).parent)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """A local head from `ray start --head --block` on loopback, in its own process group so that stopping it
    stops only this head (`ray stop` would stop every Ray on the machine)."""
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    dashboard = free_port()
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    log = open(tmp_path / "ray-head.log", "w")
    head = subprocess.Popen(
        [f"{VENV_BIN}/ray", "start", "--head", "--block", f"--port={free_port()}", "--num-cpus=2", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
         # Fresh ports for the node's agents too, so that another Ray on the machine cannot collide with them.
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{address}/api/version", timeout=5):
                break
        except urllib.error.HTTPError:  # answering at all (even 401 when Ray's token auth is on) means it is up
            break
        except OSError:
            if head.poll() is not None or time.monotonic() > deadline:
                stop_group(head, grace=60)
                pytest.fail(f"ray head did not start: {(tmp_path / 'ray-head.log').read_text()[-2000:]}")
            time.sleep(1)
    yield env, address
    stop_group(head, grace=60)
    log.close()
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_the_tiny_spec_and_produces_a_model(ray_head, tmp_path):
    env, address = ray_head
    output = tmp_path / "run"
    command = [
        f"{VENV_BIN}/ray", "job", "submit", "--address", address, "--working-dir", ".", "--",
        "python", "-m", "workflows.run", "specs/tiny.yaml",
        "--set", f"output_dir={output}", "--set", f"data.sources[0].path={NQ}", "--set", "data.limit=12",
        # The job runs in a copy of the working dir, where ../shared/data does not exist: absolute paths.
        "--set", f"evaluation.data_dir={DATA}", "--set", "evaluation.tasks=[LocalSTSBenchmark,LocalSciFact]",
    ]
    # `ray start --head` turns on token auth (token in ~/.ray/auth_token); the client sends it in token mode.
    deadline = time.monotonic() + 120
    while True:
        result = subprocess.run(command, env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=900, check=False)
        # The head's HTTP server answers before its node's job agent has registered; only that case is retried.
        if "No available agent to submit job" not in result.stderr or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout
    model_dirs = list(output.glob("train/*/model"))
    assert len(model_dirs) == 1
    assert LLM2VecGen.load(model_dirs[0]).encode(["is it raining?"]).shape == (1, 64)
    summary = json.loads((model_dirs[0].parent / "result.json").read_text())
    assert summary["steps"] == load_spec("specs/tiny.yaml").training.max_steps
    # the evaluate stage ran by default and the job's summary ends with its score table
    reports = list(output.glob("evaluation/*/results.json"))
    assert len(reports) == 1
    assert set(json.loads(reports[0].read_text())["models"]["llm2vec-gen"]) == {"LocalSTSBenchmark", "LocalSciFact"}
    assert "| LocalSciFact | Retrieval | ndcg_at_10 |" in result.stdout


def test_a_tiny_sweep_runs_each_trial_under_one_parent_run_writes_the_best_spec_and_resumes(tmp_path, monkeypatch):

    from workflows.sweep import main

    sweep = "{space: {training.lr: {kind: grid, values: [0.002, 0.02]}}, metric: holdout_reconstruction_loss, mode: min, num_trials: 1, asha: false}"
    # A relative run folder, as users write it: Tune runs trials in their own working directories, and their
    # models must still land in this folder.
    spec_file = str(Path("specs/tiny.yaml").resolve())
    monkeypatch.chdir(tmp_path)
    args = [spec_file, "--set", "output_dir=run", "--set", f"data.sources[0].path={NQ}",
            "--set", "data.limit=16", "--set", "data.holdout_fraction=0.25", "--set", "training.max_steps=4",
            "--set", "training.checkpoint_every=2", "--set", "training.max_failures=0", "--set", f"sweep={sweep}"]
    # The first trial to reach step 3 loses its worker (once): with no retries left, that trial fails.
    monkeypatch.setenv("LLM2VEC_GEN_FAIL_AT_STEP", f"3:{tmp_path / 'killed-once'}")
    try:
        assert main(args) == 1  # one trial failed: exit 1, "run the same command again"
        finished = {path: path.stat().st_mtime_ns for path in (tmp_path / "run").glob("train/*/result.json")}
        assert len(finished) == 1 and (tmp_path / "killed-once").exists()
        assert main(args) == 0  # the same command resumes the sweep: the failed trial runs again, the other is kept
    finally:
        import ray

        ray.shutdown()
    results = list((tmp_path / "run").glob("train/*/result.json"))
    assert len(results) == 2
    assert all(path.stat().st_mtime_ns == mtime for path, mtime in finished.items())  # not trained again
    best = yaml.safe_load((tmp_path / "run" / "sweep" / "best.yaml").read_text())
    assert best["training"]["lr"] in (0.002, 0.02) and best["sweep"] is None
    # every trial is an MLflow run under the sweep's parent run
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 2

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["llm2vec-gen-tiny"])
    parents = runs[runs["tags.mlflow.runName"].str.startswith("sweep-")]
    assert len(parents) == 1
    children = runs[runs["tags.mlflow.parentRunId"] == parents.iloc[0]["run_id"]]
    assert sorted(children["params.training.lr"]) == ["0.002", "0.02"]
    assert children["metrics.holdout_reconstruction_loss"].notna().all()
