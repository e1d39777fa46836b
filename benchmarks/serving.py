"""Serving throughput with dynamic batching against without it, and a replica's memory against two backbones.

    python -m benchmarks.serving [--requests 2000] [--concurrency 32] [--rounds 4] [--threads 1]
                                 [--spec SPEC] [--set key=value ...] [--num-gpus 0.5]

An untrained model on the real backbone of specs/smollm2-135m.yaml (throughput does not depend on training) is
served twice on one local Ray Serve over loopback, both applications built by serve.app.build_app with the
same settings except max_batch_size:
    batched    max_batch_size from the spec (texts from concurrent requests share forward passes)
    unbatched  max_batch_size 1 (one text per forward pass)
`concurrency` closed-loop clients send one text per request: real questions (NQ-open dev) mixed with longer
texts (SciFact abstracts, cut to 600 characters), the same texts in the same order for both. The requests are
split into `rounds` and the two applications take turns, so that load from another process on the machine
hurts neither side more. Reported per side: throughput, p50/p99 latency and errors (any answer but 200).

Memory: the resident set (RSS) of a serving replica, which holds the backbone once for both encoding and
decoding, next to plain processes that load our model (one backbone) and that load the backbone twice (what
the official package does: one copy to encode, one to decode).
With --num-gpus each application's replica takes that share of a GPU (0.5: both on one GPU), and the memory
report adds the GPU memory of the replica (nvidia-smi) and of the plain processes (torch's peak allocation).
The last line printed is `serving ratio: X.XX errors: N` (batched over unbatched throughput; errors of both).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from workflows._cli import add_spec_arguments, spec_from_args

SPEC = "specs/smollm2-135m.yaml"
QUESTIONS = "../shared/data/nq_open/NQ-open.dev.jsonl"
ABSTRACTS = "../shared/data/scifact/corpus.jsonl"
LONG_FRACTION = 0.25
LONG_CHARS = 600


def load_texts(count: int, seed: int = 0) -> list[str]:
    """`count` texts: about 3 in 4 real questions, 1 in 4 abstracts cut to LONG_CHARS, in a fixed random order."""
    with open(QUESTIONS) as handle:
        questions = [json.loads(line)["question"] for line in handle]
    with open(ABSTRACTS) as handle:
        abstracts = [json.loads(line)["text"][:LONG_CHARS] for line in handle]
    abstracts = [text for text in abstracts if text.strip()]
    rng = random.Random(seed)
    return [rng.choice(abstracts) if rng.random() < LONG_FRACTION else rng.choice(questions) for _ in range(count)]


@dataclass
class Side:
    name: str
    url: str
    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    replica: str = ""  # what the replica's own metrics say of the run (batch sizes, pass and queue times)

    def record_error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def load_test(side: Side, texts: list[str], concurrency: int) -> None:
    """Closed loop: `concurrency` clients, each sending its next text as soon as its last answer is in."""
    import aiohttp

    queue: asyncio.Queue[str] = asyncio.Queue()
    for text in texts:
        queue.put_nowait(text)
    timeout = aiohttp.ClientTimeout(total=600)

    async def client(session) -> None:
        while not queue.empty():
            text = queue.get_nowait()
            started = time.perf_counter()
            try:
                async with session.post(f"{side.url}/v1/embeddings", json={"input": text}) as response:
                    body = await response.read()
                    if response.status != 200:
                        side.record_error(str(response.status))
                        continue
                    if len(json.loads(body)["data"]) != 1:
                        side.record_error("bad body")
                        continue
            except Exception as err:  # a refused or dropped connection is an error of the server under load
                side.record_error(type(err).__name__)
                continue
            side.latencies.append(time.perf_counter() - started)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        side.seconds += time.perf_counter() - started


def replica_summary(url: str) -> str:
    """Mean texts per forward pass, pass time, queue time and in-app request time, from the replica's /metrics."""
    import urllib.request

    sums: dict[str, float] = {}
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
        for line in response.read().decode().splitlines():
            series, _, value = line.rpartition(" ")
            name, _, labels = series.partition("{")
            wanted = not labels or 'route="/v1/embeddings"' in labels or 'kind="embed"' in labels
            if not line.startswith("#") and name.endswith(("_sum", "_count")) and wanted:
                sums[name] = float(value)

    def mean(metric: str) -> float:
        count = sums.get(f"{metric}_count", 0.0)
        return sums.get(f"{metric}_sum", 0.0) / count if count else float("nan")

    return (f"{sums.get('llm2vec_batch_size_count', 0):.0f} passes of {mean('llm2vec_batch_size'):.1f} texts, "
            f"{mean('llm2vec_inference_seconds') * 1000:.1f} ms per pass, queue {mean('llm2vec_queue_seconds') * 1000:.1f} ms, "
            f"in-app request {mean('llm2vec_request_seconds') * 1000:.1f} ms")


def replica_processes(app_name: str) -> list:
    """The replica processes of an application (Ray names them ServeReplica:<app>:<deployment>)."""
    import psutil

    return [process for process in psutil.process_iter(["cmdline"])
            if any(f"ServeReplica:{app_name}:" in part for part in process.info["cmdline"] or [])]


def replica_rss(app_name: str) -> int:
    """RSS in bytes of the replica process of an application (0 if none is found)."""
    processes = replica_processes(app_name)
    return processes[0].memory_info().rss if processes else 0


# Each prints "<RSS bytes> <peak GPU bytes>"; argv: a model folder or spec file, the device, then --set overrides.
_LOAD_ONCE = """
import psutil, sys, torch
from components.model import LLM2VecGen
model = LLM2VecGen.load(sys.argv[1]).to(sys.argv[2])
model.encode(["warm up"]); model.decode("warm up", max_new_tokens=2)
gpu = torch.cuda.max_memory_allocated() if sys.argv[2] == "cuda" else 0
print(psutil.Process().memory_info().rss, gpu)
"""

_LOAD_TWICE = """
import psutil, sys, torch
from components.backbone import load_backbone
from components.spec import load_spec
spec = load_spec(sys.argv[1], sys.argv[3:])
encoder, decoder = load_backbone(spec.backbone), load_backbone(spec.backbone)  # two copies, as the official package
with torch.inference_mode():  # a pass through each touches all of its weights, as serving would
    for copy in (encoder, decoder):
        copy.model.to(sys.argv[2])(input_ids=torch.tensor([[1, 2, 3]], device=sys.argv[2]))
gpu = torch.cuda.max_memory_allocated() if sys.argv[2] == "cuda" else 0
print(psutil.Process().memory_info().rss, gpu)
"""


def memory_of(code: str, *arguments: str) -> tuple[int, int]:
    """(RSS, peak GPU bytes) of a fresh process running `code`."""
    output = subprocess.run([sys.executable, "-c", code, *arguments], capture_output=True, text=True, check=True)
    rss, gpu = output.stdout.strip().splitlines()[-1].split()
    return int(rss), int(gpu)


def replica_gpu_memory(app_name: str) -> int | None:
    """GPU memory in bytes that nvidia-smi reports for the replica process of an application (None if unknown)."""
    pids = {process.pid for process in replica_processes(app_name)}
    try:
        output = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    for line in output.strip().splitlines():
        pid, used = (part.strip() for part in line.split(","))
        if pid.isdigit() and int(pid) in pids:
            return int(used) << 20
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per side")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4, help="turns each side takes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per replica (the machine has few cores)")
    add_spec_arguments(parser, default=SPEC)  # the spec whose backbone and serving settings are served
    parser.add_argument("--num-gpus", type=float, default=0.0,
                        help="GPU share of each application's replica (0.5: both applications on one GPU)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray binds loopback only
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the replicas (Ray keeps a value already set)
    import ray
    from ray import serve

    from components.model import LLM2VecGen
    from serve.app import build_app

    spec = spec_from_args(args)
    if spec is None:
        return 2
    device = "cuda" if args.num_gpus > 0 else "cpu"
    texts = load_texts(args.requests)
    workdir = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    started = time.perf_counter()
    model = LLM2VecGen.from_spec(spec, embedding_dim=384)
    folder = model.save(workdir / "smollm2-135m-untrained")
    lengths = [len(row) for row in model.tokenizer(texts)["input_ids"]]
    print(f"model: {folder} (backbone ready in {time.perf_counter() - started:.1f}s); {len(texts)} texts per side, "
          f"{sum(lengths) / len(lengths):.0f} tokens on average (max {max(lengths)}), "
          f"{args.concurrency} clients, {args.threads} torch thread(s) per replica")
    del model

    ray.init(num_cpus=2, num_gpus=1 if args.num_gpus > 0 else 0, include_dashboard=False, log_to_driver=False,
             object_store_memory=1 << 30)  # serving keeps nothing in the object store; /dev/shm may be small
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    sides = []
    try:
        for name, max_batch_size in (("batched", spec.serving.max_batch_size), ("unbatched", 1)):
            serving = spec.serving.model_dump() | {"max_batch_size": max_batch_size, "num_cpus": 1, "num_gpus": args.num_gpus}
            serve.run(build_app({"model": str(folder), "serving": serving}), name=name,
                      route_prefix=f"/{name}")
            sides.append(Side(name, f"http://127.0.0.1:{port}/{name}"))
        for side in sides:  # warm up: first passes allocate
            asyncio.run(load_test(Side("warm-up", side.url), texts[:8], args.concurrency))
        per_round = -(-len(texts) // args.rounds)
        for round_index in range(args.rounds):
            chunk = texts[round_index * per_round : (round_index + 1) * per_round]
            for side in sides if round_index % 2 == 0 else sides[::-1]:
                asyncio.run(load_test(side, chunk, args.concurrency))
            print(f"  round {round_index + 1}/{args.rounds}: "
                  + ", ".join(f"{side.name} {side.throughput:.2f} req/s so far" for side in sides), flush=True)
        for side in sides:
            side.replica = replica_summary(side.url)
        replica_memory, replica_gpu = replica_rss("batched"), replica_gpu_memory("batched") if device == "cuda" else None
    finally:
        serve.shutdown()
        ray.shutdown()

    for side in sides:
        errors = sum(side.errors.values())
        print(f"{side.name:>9}: {side.throughput:6.2f} requests/s, p50 {side.percentile(0.5) * 1000:7.0f} ms, "
              f"p99 {side.percentile(0.99) * 1000:7.0f} ms, {len(side.latencies)} ok, {errors} errors {side.errors or ''}")
        print(f"{'':>11}replica: {side.replica}")
    (once, once_gpu), (twice, twice_gpu) = memory_of(_LOAD_ONCE, str(folder), device), memory_of(_LOAD_TWICE, args.spec, device, *args.set)
    mib = 1 << 20
    print(f"memory: replica RSS {replica_memory / mib:.0f} MiB (Ray worker + backbone once, encodes and decodes); "
          f"plain process with our model {once / mib:.0f} MiB; plain process with two backbones {twice / mib:.0f} MiB")
    if device == "cuda":
        served = f"{replica_gpu / mib:.0f} MiB" if replica_gpu is not None else "unknown"
        print(f"GPU memory: replica {served} (nvidia-smi, CUDA context included); peak allocated by torch: "
              f"our model {once_gpu / mib:.0f} MiB, two backbones {twice_gpu / mib:.0f} MiB")
    batched, unbatched = sides
    ratio = batched.throughput / unbatched.throughput if unbatched.throughput else float("nan")
    total_errors = sum(sum(side.errors.values()) for side in sides)
    print(f"serving ratio: {ratio:.2f} errors: {total_errors}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
