"""The cost of a run on S3 against the same run in a local folder: the tiny spec, every stage, on one machine.

    python -m benchmarks.storage [--rows 32] [--repeats 1]

Starts an S3-compatible server (moto, tests/servers.py) on 127.0.0.1, then runs `python -m workflows.run
specs/tiny.yaml` (its own process and local Ray each time) with output_dir a fresh local folder, and with
output_dir a fresh s3:// prefix, alternating, `--repeats` times each. MLflow tracking is off in both (the question
is the storage; a tracking server costs the same either way). Prints each stage's seconds (the workflow's own
"== stage X done in Ys" lines) and the ratios S3 / local per stage and in total. moto keeps objects in memory, so
this measures the storage layer's overhead (requests, staging copies, uploads), not a real network's latency.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from tests.servers import S3Server

DATA = Path("../shared/data").resolve()
STAGES = ["generate", "teach", "train", "evaluate"]


def run(output_dir: str, rows: int, env: dict[str, str]) -> tuple[float, dict[str, float]]:
    command = [sys.executable, "-m", "workflows.run", "specs/tiny.yaml", "--output-dir", output_dir,
               "--set", f"data.sources[0].path={DATA / 'nq_open' / 'NQ-open.dev.jsonl'}", "--set", f"data.limit={rows}",
               "--set", "tracking.enabled=false", "--set", f"evaluation.data_dir={DATA}",
               "--set", "evaluation.tasks=[LocalSTSBenchmark]"]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1200)
    total = time.perf_counter() - started
    if result.returncode:
        raise SystemExit(f"{output_dir}: failed\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    stages = {name: float(seconds) for name, seconds in re.findall(r"== stage (\w+) done in ([\d.]+)s", result.stdout)}
    return total, stages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.storage", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    import os

    folder = Path(tempfile.mkdtemp(prefix="i22bench"))
    server = S3Server(folder)
    server.create_bucket("bench")
    env = os.environ | server.env | {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    times: dict[str, list[tuple[float, dict[str, float]]]] = {"local": [], "s3": []}
    try:
        for _ in range(args.repeats):
            times["local"].append(run(str(folder / f"local-{uuid.uuid4().hex[:8]}"), args.rows, env))
            times["s3"].append(run(f"s3://bench/{uuid.uuid4().hex[:8]}", args.rows, env))
    finally:
        server.stop()
    print(f"tiny spec, {args.rows} rows, {args.repeats} run(s) each (median seconds):")
    print(f"{'stage':<10} {'local':>8} {'s3':>8} {'s3/local':>9}")
    for name in [*STAGES, "total"]:
        def median(kind: str, name: str = name) -> float:
            return statistics.median(total if name == "total" else stages.get(name, 0.0) for total, stages in times[kind])
        local, s3 = median("local"), median("s3")
        print(f"{name:<10} {local:8.1f} {s3:8.1f} {s3 / local if local else float('nan'):9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
