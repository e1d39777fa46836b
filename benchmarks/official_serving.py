"""Time and memory to serve official-layout folders here, and whether the served vectors are the official ones.

    python -m benchmarks.official_serving FOLDER [FOLDER ...] [--requests 64] [--port 8011]

Each FOLDER (an official-layout model: tests/fixtures/official/<arch>/export, or a SmolLM2 export written by
`python -m benchmarks.official_checkpoints --smollm2 DIR`) is served by `python -m serve.run FOLDER` on loopback, one
at a time, as a user would start it. Reported per folder: seconds from the command to the first answered
/v1/embeddings request, the replica's own load time (/info), the replica process's RSS, and `--requests` sequential
requests of 4 texts each (p50 latency, texts per second). When FOLDER has an official_outputs or export_outputs file
beside it (the official package's `encode` of the same texts), the largest difference of the served vectors from it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def post(port: int, route: str, body: dict, timeout: float = 60) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{route}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def get(port: int, route: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{route}", timeout=10) as response:
        return json.loads(response.read())


def official_reference(folder: Path):
    """(texts, vectors) the official package computed for this folder, if the fixture script left them beside it."""
    from safetensors.torch import load_file

    name = {"official": "official_outputs", "export": "export_outputs"}.get(folder.name)
    base = folder.parent / name if name else None
    if base is None or not Path(f"{base}.json").is_file():
        return None, None
    return json.loads(Path(f"{base}.json").read_text())["texts"], load_file(f"{base}.safetensors")["single"]


def measure(folder: Path, port: int, requests: int) -> dict:
    from benchmarks.serving import replica_rss

    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    started = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "serve.run", str(folder), "--port", str(port), "--num-cpus", "2",
                               "--set", "num_cpus=1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        texts, official = official_reference(folder)
        texts = texts or [f"sentence number {i} about polar bears and sea ice" for i in range(64)]
        while True:
            if server.poll() is not None:
                raise SystemExit(f"serve.run {folder} exited: {server.stderr.read()[-3000:]}")
            try:
                post(port, "/v1/embeddings", {"input": texts[:1]}, timeout=5)
                break
            except OSError:
                time.sleep(0.5)
        ready = time.perf_counter() - started
        info = get(port, "/info")
        latencies = []
        for index in range(requests):
            batch = [texts[(4 * index + k) % len(texts)] for k in range(4)]
            begin = time.perf_counter()
            post(port, "/v1/embeddings", {"input": batch})
            latencies.append(time.perf_counter() - begin)
        figures = {
            "ready_seconds": round(ready, 1), "replica_load_seconds": info.get("load_seconds"),
            "replica_rss_mib": round(replica_rss("llm2vec-gen") / 2**20), "p50_ms": round(statistics.median(latencies) * 1000, 1),
            "texts_per_second": round(4 * requests / sum(latencies), 1),
        }
        if official is not None:
            import torch

            served = []
            for start in range(0, len(texts), 16):
                # normalize false: the API's default is unit vectors (OpenAI's); the official encode's are raw.
                answer = post(port, "/v1/embeddings", {"input": texts[start : start + 16], "normalize": False})
                served += [row["embedding"] for row in sorted(answer["data"], key=lambda row: row["index"])]
            figures["served_vs_official_max_abs_diff"] = (torch.tensor(served) - official).abs().max().item()
        return figures
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.official_serving", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--port", type=int, default=8011)
    args = parser.parse_args(argv)
    print(f"load: {os.getloadavg()[0]:.2f}", flush=True)
    report = {str(folder): measure(folder.resolve(), args.port, args.requests) for folder in args.folders}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
