"""Real servers for the cluster tests, started and stopped by the tests themselves, all on 127.0.0.1:

    S3Server      moto in server mode (an S3-compatible endpoint that checks credentials)
    MlflowServer  `mlflow server`: SQLite backend store in a local folder, artifacts on the S3 server
    RayNodes      a head (`ray start --head`, no CPUs: nothing but the driver runs there) and a worker node whose
                  processes live in their own mount namespace with private tmpfs mounts over the test's folder (the
                  head's Ray session and TMPDIR) and /tmp/ray, so that they cannot see any file the head node writes
                  there (Ray's per-job copies of the project among them)

Every process is started in its own process group and ended by that group's id, never by name (several test
sessions may share the machine).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

PYTHON = sys.executable
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_group(process: subprocess.Popen, grace: float = 20) -> None:
    """SIGTERM to the process group of `process` (which it leads), then SIGKILL what is left."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_for(check, what: str, timeout: float = 120, interval: float = 0.5):
    deadline, last = time.time() + timeout, None
    while time.time() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception as err:  # not up yet
            last = err
        time.sleep(interval)
    raise TimeoutError(f"{what} not ready after {timeout}s (last error: {last!r})")


class S3Server:
    """moto's S3 on 127.0.0.1 with IAM checks on: one user whose key works; any other key is refused."""

    def __init__(self, log_dir: Path):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        env = os.environ | {"INITIAL_NO_AUTH_ACTION_COUNT": "3"}  # the three IAM calls below; then keys are checked
        self.log = open(log_dir / "moto.log", "w")
        self.process = subprocess.Popen([PYTHON, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        import boto3

        iam = boto3.client("iam", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id="setup",
                           aws_secret_access_key="setup")
        wait_for(lambda: iam.create_user(UserName="runner"), "moto server")
        iam.put_user_policy(UserName="runner", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="runner")["AccessKey"]
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
                    "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"], "AWS_REGION": "us-east-1"}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"])

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def stop(self) -> None:
        stop_group(self.process, grace=5)
        self.log.close()


class MlflowServer:
    """`mlflow server` with its backend store in `folder` and its artifacts under `artifacts` (an s3:// URI)."""

    def __init__(self, folder: Path, artifacts: str, env: dict[str, str]):
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        folder.mkdir(parents=True, exist_ok=True)
        self.log = open(folder / "mlflow-server.log", "w")
        self.process = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination", artifacts],
            stdout=self.log, stderr=subprocess.STDOUT, env=os.environ | env, start_new_session=True, cwd=folder)
        wait_for(lambda: urllib.request.urlopen(f"{self.uri}/health", timeout=2).status == 200, "mlflow server", 180)

    def stop(self) -> None:
        stop_group(self.process, grace=5)
        self.log.close()


# `ray start --address` for a second node on loopback. With RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (every address
# 127.0.0.1, as this project's machines require) Ray refuses to join a node; with it 1, Ray replaces 127.0.0.1 in
# --address by the machine's outward IP, where the loopback-only head does not listen. So: the guard passes and
# addresses stay as given, in this one `ray start` process only.
JOIN_ON_LOOPBACK = (
    "import sys; import ray._private.services as services; import ray._private.ray_constants as constants; "
    "constants.ENABLE_RAY_CLUSTER = True; services.resolve_ip_for_localhost = lambda host: host; "
    "services.get_node_ip_address = lambda address=None: '127.0.0.1'; "
    "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()"
)


def set_auth_mode(mode: str | None) -> None:
    """RAY_AUTH_MODE for this process, and Ray's cached copy of it.

    Ray reads the variable once into its config: changing the variable alone leaves this process's clients on the
    old mode while a later ray.init() starts its GCS with the new one, and every later test's local Ray then fails
    with "Failed to start GCS ... InvalidAuthToken". Ray refreshes its config the same way when it turns token
    auth on itself."""
    from ray._raylet import Config

    if mode is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = mode
    Config.initialize("")


def private_folders(folder: Path) -> str:
    """Shell commands, run in the worker node's own mount namespace, that hide from it what the head writes: the
    test's folder (the head's Ray session with the per-job copies of the project, the head's TMPDIR) and Ray's
    default session folder, each under an empty tmpfs. Not a tmpfs over all of /tmp: the project and its venv may
    live there (a CI clone), and the worker must run the same Python."""
    return (f"mount -t tmpfs tmpfs {shlex.quote(str(folder))} && mkdir -p {shlex.quote(str(folder / 'tmp'))} "
            "&& mkdir -p /tmp/ray && mount -t tmpfs tmpfs /tmp/ray")


class RayNodes:
    """A two-node Ray cluster on this machine: a head without CPUs (as in ray_cluster.yaml: only the driver runs
    there, so every actor and training worker must land on the worker node) and a worker node in its own mount
    namespace. Jobs are submitted and watched with Ray's job SDK (token auth, as `ray start --head` sets up)."""

    def __init__(self, folder: Path, worker_cpus: int = 4):
        self.folder = folder
        self.port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.auth_mode_before = os.environ.get("RAY_AUTH_MODE")
        set_auth_mode("token")  # this process's job SDK sends the token (~/.ray/auth_token); undone by stop()
        # The head and its jobs' drivers keep their temporary files inside the test's folder (hidden from the worker).
        (folder / "tmp").mkdir(exist_ok=True)
        self.env = os.environ | {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PATH": f"{BIN}:{os.environ['PATH']}",
                                 "TMPDIR": str(folder / "tmp")}
        self.env.pop("RAY_ADDRESS", None)
        self.temp_dir = folder / "rh"
        self.logs = [open(folder / "ray-head.log", "w"), open(folder / "ray-worker.log", "w")]

        def ports() -> list[str]:  # fresh ports for each node's agents: two nodes (and other Rays) share the machine
            return ["--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
                    "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
                    "--node-manager-port", str(free_port()), "--object-manager-port", str(free_port())]

        ray = str(BIN / "ray")
        self.head = subprocess.Popen(
            [ray, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(self.port),
             "--num-cpus", "0", "--num-gpus", "0", "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
             "--dashboard-port", str(self.dashboard_port), "--temp-dir", str(self.temp_dir), "--disable-usage-stats",
             "--ray-client-server-port", str(free_port()), *ports()],
            stdout=self.logs[0], stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        try:
            self.client = wait_for(self._client, "ray head", 240, interval=2)
            # The worker node: private tmpfs mounts (private_folders: the head's Ray session with the per-job copies
            # of the project, the head's TMPDIR with the stage cache), so nothing the head writes there is visible to it.
            worker = " ".join([str(PYTHON), "-c", shlex.quote(JOIN_ON_LOOPBACK), "start", "--block", "--address",
                               self.address, "--node-ip-address", "127.0.0.1", "--num-cpus", str(worker_cpus),
                               "--num-gpus", "0", "--disable-usage-stats", *ports()])
            self.worker = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                 f"{private_folders(folder)} && exec {worker}"],
                stdout=self.logs[1], stderr=subprocess.STDOUT, start_new_session=True, env=self.env)
            wait_for(lambda: len(self.alive_nodes()) == 2, "ray worker node", 240, interval=2)
        except BaseException as err:
            self.stop()
            raise RuntimeError(f"the two-node cluster did not start: {err}\n{self.log_tails()}") from err

    def _client(self):
        from ray.job_submission import JobSubmissionClient

        if self.head.poll() is not None:
            raise RuntimeError(f"ray head exited: {(self.folder / 'ray-head.log').read_text()[-2000:]}")
        return JobSubmissionClient(self.dashboard)

    def alive_nodes(self) -> list:
        from ray.util.state import list_nodes

        return [node for node in list_nodes(address=self.dashboard) if node.state == "ALIVE"]

    def worker_node_id(self) -> str:
        return next(node.node_id for node in self.alive_nodes() if not node.is_head_node)

    def submit(self, entrypoint: str, env_vars: dict[str, str], working_dir: Path) -> str:
        runtime_env = {"working_dir": str(working_dir), "env_vars": env_vars,
                       "excludes": ["runs/", ".venv/", ".git/", "*.log", "benchmarks/results/"]}
        # The head answers before its job agent has registered: only that case is retried.
        return wait_for(lambda: self.client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env),
                        "job submission", 180, interval=3)

    def status(self, job: str) -> str:
        return str(self.client.get_job_status(job)).rsplit(".", 1)[-1]

    def wait(self, job: str, timeout: float) -> str:
        return wait_for(lambda: (state := self.status(job)) in ("SUCCEEDED", "FAILED", "STOPPED") and state,
                        f"job {job}", timeout, interval=2)

    def logs_of(self, job: str) -> str:
        return self.client.get_job_logs(job)

    def driver_pid(self, job: str) -> int | None:
        info = self.client.get_job_info(job)
        return info.driver_info.pid if info.driver_info else None

    def stop(self) -> None:
        if getattr(self, "worker", None) is not None:
            stop_group(self.worker)
        stop_group(self.head)
        for log in self.logs:
            log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        set_auth_mode(self.auth_mode_before)

    def log_tails(self, chars: int = 3000) -> str:
        """The end of each node's `ray start` output (for a failure message)."""
        return "\n".join(f"--- {name}:\n{(self.folder / name).read_text()[-chars:]}"
                         for name in ("ray-head.log", "ray-worker.log") if (self.folder / name).is_file())
