"""The Ray Serve application: one deployment, a FastAPI ingress, the backbone loaded once per replica.

    serve run serve/config.yaml                        # or: python -m serve.run MODEL
    serve deploy serve/config.yaml                     # on a running cluster

`build_app` is the import path named in serve/config.yaml; its `args` are validated here, once, into a model
source and a ServingSpec, and only typed objects go further. Texts from concurrent requests are batched per
input by serve.batcher.Batcher (max_batch_size texts, or 1 for no batching; the next batch is formed when the
model is free, see there why not @serve.batch), and each collected batch is split into forward passes of at most
max_batch_tokens padded tokens.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError
from ray import serve
from ray.serve import Application

from components.spec import ServingSpec, SpecError, load_spec
from serve.api import create_api
from serve.batcher import Batcher
from serve.engine import EmbeddingEngine, Encoded
from serve.metrics import Metrics

log = logging.getLogger("serve.app")

REGISTRY_SCHEME = "models:/"


class AppArgs(BaseModel):
    """The `args` of serve/config.yaml (or of build_app from Python)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str  # a model folder (ours or the official layout), models:/name/version, or an official hub id
    spec: str | None = None  # a spec file whose `serving:` section is the starting point
    serving: dict[str, Any] = {}  # ServingSpec keys overriding the spec's (or the defaults)


def serving_settings(args: AppArgs) -> ServingSpec:
    """The spec's serving section (or the defaults), with args.serving's keys on top, validated."""
    base = load_spec(args.spec).serving.model_dump() if args.spec else {}
    try:
        return ServingSpec.model_validate({**base, **args.serving})
    except ValidationError as err:
        problems = "; ".join(f"serving.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise SpecError(f"serve args: {problems}") from None


def model_source(source: str) -> str:
    """A registry URI or hub id (an official release, e.g. McGill-NLP/LLM2Vec-Gen-Qwen3-0.6B) as given; a folder made
    absolute (replicas may not share the caller's working directory)."""
    from components.official_format import looks_like_hub_id

    if source.startswith(REGISTRY_SCHEME) or looks_like_hub_id(source):
        return source
    folder = Path(source).expanduser().resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"serve args: model folder not found: {folder}")
    return str(folder)


def resolve_model_dir(source: str) -> Path:
    """The local folder of a model source, downloading a registered model (models:/name/version) first."""
    if source.startswith(REGISTRY_SCHEME):
        from components.tracking import download_registered_model  # MLflow is only needed for this branch

        return Path(download_registered_model(source))
    return Path(source)


def default_model_name(source: str) -> str:
    """models:/name/version -> name; a folder -> its name."""
    if source.startswith(REGISTRY_SCHEME):
        return source[len(REGISTRY_SCHEME) :].strip("/").split("/")[0]
    return Path(source).name


def deployment_options(serving: ServingSpec) -> dict[str, Any]:
    """Ray Serve options of the deployment, from the serving section only."""
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": serving.num_cpus, "num_gpus": serving.num_gpus},
        # More than the app's own limit, so that requests past it reach the app and get its 429 at once
        # instead of waiting in Ray's queue.
        "max_ongoing_requests": 2 * serving.max_ongoing_requests,
    }
    if serving.max_replicas is not None:
        options["autoscaling_config"] = {
            "min_replicas": serving.num_replicas,
            "initial_replicas": serving.num_replicas,
            "max_replicas": serving.max_replicas,
            "target_ongoing_requests": serving.target_ongoing_requests,
        }
    else:
        options["num_replicas"] = serving.num_replicas
    return options


def read_api_key(serving: ServingSpec) -> str | None:
    """The bearer token from the env var named by api_key_env; naming one that is unset is an error, not an open door."""
    if serving.api_key_env is None:
        return None
    key = os.environ.get(serving.api_key_env, "")
    if not key:
        raise RuntimeError(f"serving.api_key_env names {serving.api_key_env}, which is not set (or empty) on this replica")
    return key


@serve.deployment(name="LLM2VecGen")
@serve.ingress()
class EmbeddingServer:
    def __init__(self, source: str, serving: ServingSpec):
        import torch

        from components.model import LLM2VecGen

        started = time.time()
        model = LLM2VecGen.load(resolve_model_dir(source), dtype=serving.dtype)
        if serving.num_gpus > 0 and torch.cuda.is_available():
            model.to("cuda")
        self.engine = EmbeddingEngine(model, serving)
        self.metrics = Metrics()
        self.model_name = serving.served_model_name or default_model_name(source)
        self.api_key = read_api_key(serving)
        self._source = source
        self._created = int(started)
        self._load_seconds = time.time() - started
        # One thread owns the model: torch runs there while the event loop keeps accepting, tokenising and
        # collecting the next batch.
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._batcher: Batcher[list[int], Encoded] = Batcher(
            self._embed_rows, serving.max_batch_size, serving.batch_wait_timeout_s, self._observe_queue
        )
        log.info("serving %s from %s (loaded in %.1fs)", self.model_name, source, self._load_seconds)

    def __serve_build_asgi_app__(self):
        return create_api(self)

    async def run(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self._model_thread, functools.partial(function, *args))

    async def embed(self, rows: list[list[int]]) -> list[Encoded]:
        """Each row joins the next batch (texts of concurrent requests share forward passes)."""
        return list(await asyncio.gather(*(self._batcher.submit(row) for row in rows)))

    async def _embed_rows(self, rows: list[list[int]]) -> list[Encoded]:
        return await self.run(self.engine.embed, rows, self.metrics.observe_pass)

    def _observe_queue(self, waits: list[float]) -> None:
        for seconds in waits:
            self.metrics.queue_seconds.observe(seconds)

    def info(self) -> dict[str, Any]:
        config, serving, backbone = self.engine.model.config, self.engine.serving, self.engine.model.backbone_info
        import torch

        return {
            "model": self.model_name,
            "source": self._source,
            "replica": serve.get_replica_context().replica_id.unique_id,
            "torch_threads": torch.get_num_threads(),
            "created": self._created,
            "load_seconds": round(self._load_seconds, 2),
            "backbone": {
                "source": backbone.spec.source,
                "name": backbone.spec.name,
                "fingerprint": backbone.fingerprint[:16],
                "architecture": self.engine.model.backbone.config.model_type,
                "hidden_size": config.hidden_size,
                "dtype": backbone.spec.dtype,
            },
            "embedding_dim": config.embedding_dim,
            "dimensions": {"min": 1, "max": config.embedding_dim},
            "thought_tokens": config.thought_tokens,
            "compression_tokens": config.compression_tokens,
            "states_shape": list(self.engine.states_shape),
            "prompts": config.prompts,
            "teacher": config.teacher,
            "limits": {
                "max_inputs_per_request": serving.max_inputs_per_request,
                "max_input_tokens": self.engine.max_input_tokens,
                "max_payload_bytes": serving.max_payload_bytes,
                "max_ongoing_requests": serving.max_ongoing_requests,
                "max_decode_tokens": serving.max_decode_tokens,
                "max_decode_inputs": serving.max_decode_inputs,
            },
            "batching": {
                "max_batch_size": serving.max_batch_size,
                "batch_wait_timeout_s": serving.batch_wait_timeout_s,
                "max_batch_tokens": serving.max_batch_tokens,
                "pass_cost_tokens": self.engine.pass_cost_tokens,
            },
            "auth": self.api_key is not None,
        }


def build_app(args: dict[str, Any] | AppArgs) -> Application:
    """The application for `serve run` / `serve deploy`: args are AppArgs (model, spec, serving)."""
    args = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    serving = serving_settings(args)
    return EmbeddingServer.options(**deployment_options(serving)).bind(model_source(args.model), serving)

