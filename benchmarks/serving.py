"""Serving throughput with dynamic batching against without it, and a replica's memory against two backbones.

    python -m benchmarks.serving [--requests 2000] [--concurrency 32] [--rounds 4] [--threads 1]

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


def replica_rss(app_name: str) -> int:
    """RSS in bytes of the replica process of an application (Ray names it ServeReplica:<app>:<deployment>)."""
    import psutil

    for process in psutil.process_iter(["cmdline"]):
        if any(f"ServeReplica:{app_name}:" in part for part in process.info["cmdline"] or []):
            return process.memory_info().rss
    return 0


_LOAD_ONCE = """
import psutil, sys
from components.model import LLM2VecGen
model = LLM2VecGen.load(sys.argv[1])
model.encode(["warm up"]); model.decode("warm up", max_new_tokens=2)
print(psutil.Process().memory_info().rss)
"""

_LOAD_TWICE = """
import psutil, sys, torch
from components.backbone import load_backbone
from components.spec import load_spec
spec = load_spec(sys.argv[1])
encoder, decoder = load_backbone(spec.backbone), load_backbone(spec.backbone)  # two copies, as the official package
with torch.inference_mode():  # a pass through each touches all of its weights, as serving would
    for copy in (encoder, decoder):
        copy.model(input_ids=torch.tensor([[1, 2, 3]]))
print(psutil.Process().memory_info().rss)
"""


def rss_of(code: str, argument: str) -> int:
    output = subprocess.run([sys.executable, "-c", code, argument], capture_output=True, text=True, check=True)
    return int(output.stdout.strip().splitlines()[-1])


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
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray binds loopback only
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the replicas (Ray keeps a value already set)
    import ray
    from ray import serve

    from components.model import LLM2VecGen
    from components.spec import load_spec
    from serve.app import build_app

    spec = load_spec(SPEC)
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

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    sides = []
    try:
        for name, max_batch_size in (("batched", spec.serving.max_batch_size), ("unbatched", 1)):
            serving = {"max_batch_size": max_batch_size, "num_cpus": 1}
            serve.run(build_app({"model": str(folder), "spec": SPEC, "serving": serving}), name=name,
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
        replica_memory = replica_rss("batched")
    finally:
        serve.shutdown()
        ray.shutdown()

    for side in sides:
        errors = sum(side.errors.values())
        print(f"{side.name:>9}: {side.throughput:6.2f} requests/s, p50 {side.percentile(0.5) * 1000:7.0f} ms, "
              f"p99 {side.percentile(0.99) * 1000:7.0f} ms, {len(side.latencies)} ok, {errors} errors {side.errors or ''}")
    once, twice = rss_of(_LOAD_ONCE, str(folder)), rss_of(_LOAD_TWICE, SPEC)
    mib = 1 << 20
    print(f"memory: replica RSS {replica_memory / mib:.0f} MiB (Ray worker + backbone once, encodes and decodes); "
          f"plain process with our model {once / mib:.0f} MiB; plain process with two backbones {twice / mib:.0f} MiB")
    batched, unbatched = sides
    ratio = batched.throughput / unbatched.throughput if unbatched.throughput else float("nan")
    total_errors = sum(sum(side.errors.values()) for side in sides)
    print(f"serving ratio: {ratio:.2f} errors: {total_errors}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
