"""Serve a model locally on loopback until Ctrl-C (for `serve deploy` on a cluster, see serve/config.yaml).

    python -m serve.run MODEL [--spec SPEC] [--set key=value ...] [--port 8000]

MODEL is a model folder (LLM2VecGen.save, or the official llm2vec-gen layout), models:/name/version, or an official
hub id (online: McGill-NLP/LLM2Vec-Gen-Qwen3-0.6B); the serving settings are the spec's
`serving:` section (defaults without --spec) with --set overrides, e.g. --set max_batch_size=1.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Any

import yaml

from components.spec import SpecError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m serve.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a model folder, models:/name/version or an official hub id")
    parser.add_argument("--spec", help="a spec file whose serving section to use")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a serving key")
    parser.add_argument("--host", help="default: serving.host (127.0.0.1)")
    parser.add_argument("--port", type=int, help="default: serving.port (8000)")
    parser.add_argument("--num-cpus", type=float, help="CPUs for the local Ray instance (default: all)")
    return parser.parse_args(argv)


def overrides(pairs: list[str]) -> dict[str, Any]:
    """--set key=value pairs as serving keys, the values read as YAML (so numbers are numbers)."""
    result = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise SpecError(f"--set {pair!r}: expected key=value")
        result[key.strip().removeprefix("serving.")] = yaml.safe_load(raw) if raw.strip() else ""
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray binds loopback only
    import ray
    from ray import serve

    from serve.app import AppArgs, build_app, serving_settings

    try:
        app_args = AppArgs(model=args.model, spec=args.spec, serving=overrides(args.set))
        serving = serving_settings(app_args)
        application = build_app(app_args)
    except (SpecError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    host, port = args.host or serving.host, args.port or serving.port
    ray.init(num_cpus=args.num_cpus, include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(application, name="llm2vec-gen", route_prefix="/")
    print(f"serving {args.model} at http://{host}:{port} (POST /v1/embeddings, POST /v1/decode); Ctrl-C stops", flush=True)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):  # Ray's driver swallows a plain KeyboardInterrupt here
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
