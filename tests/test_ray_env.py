"""The hub token and cache location reach Ray workers started by another node's raylet (components/ray_env.py)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from components.ray_env import JOB_CONFIG_ENV, worker_env_vars
from tests.servers import stop_group

VENV_BIN = str(Path(sys.executable).parent)


def test_worker_env_vars_takes_the_hub_variables_that_are_set():
    environ = {"HF_TOKEN": "hf_x", "HF_HOME": "/shared/hf", "HF_HUB_OFFLINE": "", "PATH": "/bin", "AWS_SECRET": "no"}
    assert worker_env_vars(environ) == {"HF_TOKEN": "hf_x", "HF_HOME": "/shared/hf"}
    assert worker_env_vars({}) == {}


def test_worker_env_vars_leaves_what_the_submitted_job_passes_already():
    # Ray refuses to merge a ray.init runtime_env that names a variable the job's own runtime_env names.
    job = {"runtime_env": {"env_vars": {"HF_TOKEN": "hf_x"}, "working_dir": "gcs://x.zip"}}
    environ = {"HF_TOKEN": "hf_x", "HF_HOME": "/shared/hf", JOB_CONFIG_ENV: json.dumps(job)}
    assert worker_env_vars(environ) == {"HF_HOME": "/shared/hf"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


DRIVER = """
import json, os, sys
import ray
from components.ray_env import connect

if sys.argv[1] == "connect":
    connect(include_dashboard=False, configure_logging=False)
else:
    ray.init(address=os.environ["RAY_ADDRESS"], configure_logging=False)

@ray.remote(num_cpus=0)
def read_task():
    return {name: os.environ.get(name) for name in ("HF_TOKEN", "HF_HOME")}

@ray.remote(num_cpus=0)
class Reader:
    def read(self):
        return {name: os.environ.get(name) for name in ("HF_TOKEN", "HF_HOME")}

print(json.dumps({"task": ray.get(read_task.remote()), "actor": ray.get(Reader.remote().read.remote())}))
"""


@pytest.fixture
def ray_head_without_token(tmp_path):
    """A Ray head started with an environment that has no hub variables, like another node's raylet."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGING_FACE", "RAY_ADDRESS"))}
    env |= {"PATH": f"{VENV_BIN}:{os.environ['PATH']}", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    port, temp_dir = free_port(), tempfile.mkdtemp(prefix="rt", dir="/tmp")
    log = open(tmp_path / "ray-head.log", "w")
    head = subprocess.Popen(
        [f"{VENV_BIN}/ray", "start", "--head", "--block", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
         f"--temp-dir={temp_dir}", "--disable-usage-stats", f"--dashboard-agent-listen-port={free_port()}",
         f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
         f"--runtime-env-agent-port={free_port()}", f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while True:  # up once its GCS port answers
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
            break
        if head.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"ray head did not start: {(tmp_path / 'ray-head.log').read_text()[-2000:]}")
        time.sleep(1)
    yield env, f"127.0.0.1:{port}"
    stop_group(head, grace=60)
    log.close()
    shutil.rmtree(temp_dir, ignore_errors=True)


def run_driver(env: dict[str, str], address: str, how: str) -> dict:
    driver_env = {**env, "RAY_ADDRESS": address, "RAY_AUTH_MODE": "token", "HF_TOKEN": "hf_test_token",
                  "HF_HOME": "/tmp/hf-home-for-test", "PYTHONPATH": os.getcwd()}
    deadline = time.monotonic() + 60
    while True:
        result = subprocess.run([sys.executable, "-c", DRIVER, how], env=driver_env, capture_output=True, text=True,
                                timeout=300, check=False)
        if result.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(3)  # the head's raylet may not have registered yet
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_worker_of_a_separately_started_node_reads_the_drivers_hub_token(ray_head_without_token):
    env, address = ray_head_without_token
    expected = {"HF_TOKEN": "hf_test_token", "HF_HOME": "/tmp/hf-home-for-test"}
    # Control: a plain ray.init leaves the workers with the raylet's environment, so the test can fail.
    assert run_driver(env, address, "plain") == {"task": {"HF_TOKEN": None, "HF_HOME": None},
                                                 "actor": {"HF_TOKEN": None, "HF_HOME": None}}
    assert run_driver(env, address, "connect") == {"task": expected, "actor": expected}
