"""The train stage at paper scale: memory and start-up against the number of rows, and the cost of reporting.

    python -m benchmarks.scale [--sizes 10000,50000,200000] [--dim 4096] [--steps 30] [--old-rows 10000]
                               [--work /tmp/llm2vec-scale] [--keep] [--log-steps 40]

For each size, a synthetic teach output of rows x dim (real NQ-open questions from ../shared/data, answers of
20-120 words drawn from their vocabulary, random unit float32 vectors; Parquet shards of 1,024 rows, as the teach
stage writes them; built once under --work and reused) is trained on by the train stage itself
(workflows.run.stage_train: the Arrow file is built from the shards, then Ray Train) on the tiny random backbone
(specs/tiny.yaml) with two workers, micro batches of 4, for --steps steps. Each run is its own process (a fresh
Ray), which prints:
    driver_rss   the driver's peak RSS (ru_maxrss)
    worker_rss   each Ray Train worker's peak RSS (ru_maxrss, written by the worker: workers/rank-<r>.json)
    other_rss    the largest peak RSS among the run's other processes (the controller, Ray Data tasks, the raylet),
                 sampled every 0.2 s
    store        the object store's peak use, sampled every 0.2 s
    first_step   seconds from the stage's start to the end of the first optimizer step (rank 0)
    steps/s      rank 0's rate from the end of its first step to the end of its last non-checkpoint step
Then one process reads every row of the largest size's training file through the workers' reader, 8 rows at a
time (an epoch of one worker), and prints its peak RSS: the pages read are released as it goes.
In the same run, the data path before issue 16 (benchmarks/_legacy_train_data.py: rows as Python tuples, Ray
Data from_items, every worker holding all rows) trains at --old-rows rows (0: skip), for comparison.

Then the tiny spec as it ships (one worker, 4 rows a step, MLflow on) on a small synthetic output trains for
--log-steps steps once with training.log_every 1 and once with log_every = --log-steps (checkpoint only at the
end in both), and prints both rates and their ratio. The last line is
`scale: rows R dim D peak_rss_mib P first_step_s T` for the largest size, P the largest peak RSS of any process.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
NQ = ROOT / ".." / "shared" / "data" / "nq_open" / "NQ-open.dev.jsonl"
SHARD_SIZE = 1024


# --------------------------------------------------------------------------------------- synthetic inputs


def synthetic_teach_output(folder: Path, rows: int, dim: int):
    """A complete teach stage output of `rows` rows with `dim`-dimensional targets (built shard by shard)."""
    import pyarrow as pa

    from components.stages import ShardedOutput

    output = ShardedOutput.open(folder, {"stage": "teach", "synthetic": True, "rows": rows, "dim": dim}, rows, SHARD_SIZE)
    if output.complete:
        return output
    questions = [json.loads(line)["question"] for line in NQ.read_text().splitlines() if line.strip()]
    vocabulary = sorted({word.strip("?,.'\"") for question in questions for word in question.split()} - {""})
    for shard in output.missing_shards():
        ids = output.shard_ids(shard)
        rng = random.Random(shard)
        queries = [f"{questions[i % len(questions)]}" + ("" if i < len(questions) else f" ({i // len(questions)})") for i in ids]
        answers = [" ".join(rng.choices(vocabulary, k=rng.randint(20, 120))).capitalize() + "." for _ in ids]
        vectors = np.random.default_rng(shard).standard_normal((len(ids), dim), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        table = pa.table({
            "id": pa.array(list(ids), pa.int64()), "query": queries, "response": answers,
            "prompt_tokens": pa.array([len(q) for q in queries], pa.int64()),
            "response_tokens": pa.array([len(a) for a in answers], pa.int64()),
            "finish_reason": ["stop"] * len(ids),
            "teacher": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim).cast(pa.list_(pa.float32())),
        })
        output.write_shard(shard, table)
    output.finish({"stage": "teach", "dimension": dim})
    return output


# --------------------------------------------------------------------------------------------- one run


class Sampler:
    """Peak RSS of this process's descendants and peak object store use, sampled in a thread."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.other_rss, self.store = interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join()

    def _run(self):
        import psutil

        me = psutil.Process()
        state = None
        while not self._stop.is_set():
            for child in me.children(recursive=True):
                try:
                    if "RayTrainWorker" not in " ".join(child.cmdline()):  # the train workers report their own
                        self.other_rss = max(self.other_rss, child.memory_info().rss)
                except psutil.Error:
                    pass
            try:
                import ray
                from ray._private.internal_api import get_memory_info_reply, get_state_from_address

                if ray.is_initialized():
                    state = state or get_state_from_address(ray.get_runtime_context().gcs_address)
                    used = get_memory_info_reply(state, timeout_seconds=5).store_stats.object_store_bytes_used
                    self.store = max(self.store, used)
            except Exception:  # Ray starting or stopping
                pass
            self._stop.wait(self.interval)


def child(args) -> None:
    """One train stage run (in its own process); prints one JSON line of measurements."""
    import resource

    started = time.time()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    from components.spec import load_spec

    overrides = [f"output_dir={args.out}", *args.set]
    spec = load_spec(str(ROOT / "specs" / "tiny.yaml"), overrides)
    sampler = Sampler().start()
    for attempt in range(3):  # on a loaded machine the raylet can miss Ray's fixed 30 s start-up wait
        try:
            ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
            break
        except Exception as err:
            if "timed out during startup" not in str(err) or attempt == 2:
                raise
            ray.shutdown()
    stage_started = time.time()
    if args.legacy:
        from benchmarks._legacy_train_data import LegacyRows
        from workflows.train import run_train

        legacy = LegacyRows.from_teach_output(args.teach)
        prepared = time.time()
        result = run_train(spec, legacy, embedding_dim=legacy.dimension, rows_fingerprint=legacy.fingerprint)
        del legacy
    else:
        from workflows.train import run_train, training_data

        # What workflows.run's stage_train does, in its two parts, timed apart.
        data = training_data(spec, args.teach)
        prepared = time.time()
        result = run_train(spec, data, embedding_dim=data.dimension, rows_fingerprint=data.fingerprint)
    ray.shutdown()
    sampler.stop()
    stats = [json.loads(path.read_text()) for path in sorted((Path(result["model_dir"]).parent / "workers").glob("rank-*.json"))]
    rank0 = stats[0]
    times = rank0["step_end_unix"]
    # The last step ends with the checkpoint; the rate is over the steps between the first and it.
    rate = (len(times) - 2) / (times[-2] - times[0]) if len(times) > 2 else float("nan")
    print("RESULT " + json.dumps({
        "driver_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_rss_mib": [s["peak_rss_mib"] for s in stats],
        "other_rss_mib": sampler.other_rss / 2**20,
        "store_mib": sampler.store / 2**20,
        "first_step_s": times[0] - stage_started,
        "prepare_s": prepared - stage_started,  # the driver's reading of the teach output
        "workers_up_s": min(s["loop_started_unix"] for s in stats) - prepared,  # Ray Train starting its workers
        "worker_first_step_s": times[0] - rank0["loop_started_unix"],  # model, rows' lengths, DeepSpeed, one step
        "ray_start_s": stage_started - started,
        "steps_per_s": rate,
        "steps": len(times),
    }), flush=True)


def scan(path: str) -> None:
    """Every row of a training file read through one worker's view, 8 at a time (an epoch on one worker)."""
    import resource

    from components.train_data import TrainingFile

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    file = TrainingFile(path)
    for start in range(0, len(file), 8):
        file.rows(range(start, min(start + 8, len(file))))
    print("RESULT " + json.dumps({"rows": len(file), "file_mib": os.path.getsize(path) / 2**20, "seconds": time.perf_counter() - started,
                                  "rss_before_mib": before, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run_child(label: str, teach: Path, out: Path, overrides: list[str], legacy: bool = False, timeout: int = 3600) -> dict | None:
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "benchmarks.scale", "--child", "--teach", str(teach), "--out", str(out)]
    command += [item for override in overrides for item in ("--set", override)] + (["--legacy"] if legacy else [])
    started = time.perf_counter()
    process = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False,
                             env={**os.environ, "PYTHONPATH": str(ROOT), "RAY_DATA_DISABLE_PROGRESS_BARS": "1"})
    found = re.search(r"^RESULT (.*)$", process.stdout, re.M)
    if process.returncode or not found:
        print(f"{label}: failed (exit {process.returncode}) after {time.perf_counter() - started:.0f}s:\n"
              f"{process.stdout[-1500:]}\n{process.stderr[-3000:]}", flush=True)
        return None
    return json.loads(found.group(1))


def show(label: str, result: dict) -> str:
    workers = "/".join(f"{value:.0f}" for value in result["worker_rss_mib"])
    return (f"{label:<28} driver_rss {result['driver_rss_mib']:7.0f} MiB  worker_rss {workers:>11} MiB  "
            f"other_rss {result['other_rss_mib']:6.0f} MiB  store {result['store_mib']:6.0f} MiB  "
            f"first_step {result['first_step_s']:6.1f} s (prepare {result['prepare_s']:.1f} + workers up "
            f"{result['workers_up_s']:.1f} + worker to step 1 {result['worker_first_step_s']:.1f})  "
            f"steps/s {result['steps_per_s']:6.2f}")


def peak(result: dict) -> float:
    return max(result["driver_rss_mib"], result["other_rss_mib"], *result["worker_rss_mib"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,50000,200000")
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--old-rows", type=int, default=10000, help="rows for the data path before issue 16 (0: skip)")
    parser.add_argument("--log-steps", type=int, default=40, help="steps of the log_every comparison (0: skip)")
    parser.add_argument("--work", default="/tmp/llm2vec-scale")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic teach outputs for the next run")
    # the child process
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--legacy", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--teach", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--scan", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0
    if args.scan:
        scan(args.scan)
        return 0

    work = Path(args.work)
    sizes = [int(size) for size in args.sizes.split(",")]
    train = ["training.num_workers=2", "training.batch_size=8", "training.micro_batch_size=4",
             f"training.max_steps={args.steps}", f"training.checkpoint_every={args.steps}", "training.log_every=10",
             "training.warmup_steps=1", "training.max_response_tokens=64", "data.holdout_fraction=0.01",
             "training.decode_samples=0"]
    results: dict[str, dict] = {}
    if args.log_steps:
        teach = synthetic_teach_output(work / "teach-tiny", 256, 64)
        base = [f"training.max_steps={args.log_steps}", f"training.checkpoint_every={args.log_steps}"]
        every = run_child("log_every 1", teach.folder, work / "run-log-1", [*base, "training.log_every=1"])
        once = run_child("log_every max", teach.folder, work / "run-log-max", [*base, f"training.log_every={args.log_steps}"])
        if every and once:
            print(f"tiny spec, {args.log_steps} steps: log_every 1 {every['steps_per_s']:.2f} steps/s, "
                  f"log_every {args.log_steps} {once['steps_per_s']:.2f} steps/s "
                  f"(ratio {every['steps_per_s'] / once['steps_per_s']:.2f})", flush=True)
    for rows in sorted(set(sizes + ([args.old_rows] if args.old_rows else []))):
        started = time.perf_counter()
        teach = synthetic_teach_output(work / f"teach-{rows}x{args.dim}", rows, args.dim)
        print(f"synthetic teach output {rows} x {args.dim}: {teach.folder} ({time.perf_counter() - started:.0f}s)", flush=True)
        if rows in sizes:
            result = run_child(f"new {rows}", teach.folder, work / f"run-new-{rows}", train)
            if result:
                results[f"new {rows}"] = result
                print(show(f"rows {rows} dim {args.dim}", result), flush=True)
        if rows == args.old_rows:
            result = run_child(f"old {rows}", teach.folder, work / f"run-old-{rows}", train, legacy=True)
            if result:
                results[f"old {rows}"] = result
                print(show(f"rows {rows} dim {args.dim} (old path)", result), flush=True)
        if not args.keep:
            shutil.rmtree(teach.folder, ignore_errors=True)
    if args.old_rows and f"old {args.old_rows}" in results and f"new {args.old_rows}" in results:
        old, new = results[f"old {args.old_rows}"], results[f"new {args.old_rows}"]
        print(f"at {args.old_rows} rows: largest peak RSS old {peak(old):.0f} MiB, new {peak(new):.0f} MiB "
              f"(ratio {peak(old) / peak(new):.2f}); first step old {old['first_step_s']:.1f} s, new {new['first_step_s']:.1f} s")
    small, large = f"new {min(sizes)}", f"new {max(sizes)}"
    if small in results and large in results and small != large:
        print(f"steps/s at {max(sizes)} rows over {min(sizes)} rows: "
              f"{results[large]['steps_per_s'] / results[small]['steps_per_s']:.2f}")

    files = sorted((work / f"run-new-{max(sizes)}" / "train_data").glob("*/rows.arrow"))
    if files:
        process = subprocess.run([sys.executable, "-m", "benchmarks.scale", "--scan", str(files[0])], cwd=ROOT,
                                 capture_output=True, text=True, check=False, env={**os.environ, "PYTHONPATH": str(ROOT)})
        found = re.search(r"^RESULT (.*)$", process.stdout, re.M)
        if found:
            read = json.loads(found.group(1))
            print(f"every row of the {read['rows']}-row file ({read['file_mib']:.0f} MiB) read 8 at a time by one process: "
                  f"{read['seconds']:.0f} s, peak RSS {read['peak_rss_mib']:.0f} MiB ({read['rss_before_mib']:.0f} MiB before)",
                  flush=True)

    if not args.keep:  # the training files (as large as the teach outputs) go too
        for folder in work.glob("run-*"):
            shutil.rmtree(folder, ignore_errors=True)
    largest = results.get(large)
    if largest is None:
        print(f"scale: rows {max(sizes)} dim {args.dim} failed")
        return 1
    print(f"scale: rows {max(sizes)} dim {args.dim} peak_rss_mib {peak(largest):.0f} first_step_s {largest['first_step_s']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
