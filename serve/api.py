"""The HTTP API (FastAPI), built once per replica around a backend that owns the model.

    POST /v1/embeddings   OpenAI's embeddings API (+ instruction / prompt_name, truncate, normalize, include_states)
    POST /v1/decode       texts or compression states z -> the text the frozen LLM writes from them
    GET  /v1/models, /info, /health, /metrics

The backend protocol keeps this module free of Ray: the Ray Serve deployment (serve/app.py) supplies `embed`
(dynamic batching across requests) and `run` (the replica's single model thread).
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import numpy as np
import torch
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.engine import EmbeddingEngine, Encoded
from serve.metrics import CONTENT_TYPE, Metrics
from serve.protocol import (
    ApiError,
    DecodeRequest,
    EmbeddingRequest,
    embedding_item,
    input_texts,
    shape_embedding,
    usage,
    validation_error,
)

log = logging.getLogger("serve.api")

ROUTES = ("/v1/embeddings", "/v1/decode", "/v1/models", "/info", "/health", "/metrics")
OPEN_ROUTES = frozenset({"/health", "/metrics"})  # probes and scrapers; everything else needs the key when set


class Backend(Protocol):
    engine: EmbeddingEngine
    metrics: Metrics
    model_name: str
    api_key: str | None

    async def embed(self, rows: list[list[int]]) -> list[Encoded]: ...

    async def run(self, function: Callable[..., Any], *args: Any) -> Any: ...

    def info(self) -> dict[str, Any]: ...


def create_api(backend: Backend) -> ASGIApp:
    engine, metrics, serving = backend.engine, backend.metrics, backend.engine.serving
    api = FastAPI(title="LLM2Vec-Gen embeddings", docs_url=None, redoc_url=None, openapi_url=None)
    admission = Admission(serving.max_ongoing_requests, metrics)

    def error(err: ApiError) -> JSONResponse:
        return error_response(err, metrics)

    @api.exception_handler(ApiError)
    async def _api_error(_request, err: ApiError) -> JSONResponse:
        return error(err)

    @api.exception_handler(RequestValidationError)
    async def _invalid(_request, err: RequestValidationError) -> JSONResponse:
        return error(validation_error(err.errors()))

    @api.exception_handler(StarletteHTTPException)
    async def _http(_request, err: StarletteHTTPException) -> JSONResponse:
        return error(ApiError(err.status_code, str(err.detail)))

    @api.exception_handler(Exception)
    async def _unexpected(_request, err: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return error(ApiError(500, f"internal error: {type(err).__name__}"))

    def check_model(name: str | None) -> None:
        if name is not None and name != backend.model_name:
            raise ApiError(
                404, f"model '{name}' is not served here; this server serves '{backend.model_name}'",
                param="model", code="model_not_found",
            )

    @api.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models() -> dict[str, Any]:
        entry = {"id": backend.model_name, "object": "model", "created": backend.info()["created"], "owned_by": "llm2vec-gen-ray"}
        return {"object": "list", "data": [entry]}

    @api.get("/info")
    async def info() -> dict[str, Any]:
        return backend.info()

    @api.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @api.post("/v1/embeddings")
    async def embeddings(request: EmbeddingRequest) -> JSONResponse:
        check_model(request.model)
        texts = input_texts(request.input)
        check_count(len(texts), serving.max_inputs_per_request)
        engine.check_dimensions(request.dimensions)
        prompt = engine.prompt(request)
        async with admission:
            rows = engine.tokenize(texts, prompt, request.truncate)
            encoded = await backend.embed(rows)
        data = []
        for index, item in enumerate(encoded):
            vector = shape_embedding(item.embedding, request.dimensions, request.normalize)
            entry = embedding_item(vector, index, request.encoding_format)
            if request.include_states:
                entry["states"] = item.states.tolist()
            data.append(entry)
        tokens = sum(len(row) for row in rows)
        metrics.inputs.labels("embeddings").inc(len(rows))
        metrics.prompt_tokens.inc(tokens)
        # Straight to JSON: FastAPI's encoder would walk every float of every vector first.
        return JSONResponse({"object": "list", "data": data, "model": backend.model_name, "usage": usage(tokens)})

    @api.post("/v1/decode")
    async def decode(request: DecodeRequest) -> dict[str, Any]:
        check_model(request.model)
        max_new_tokens = request.max_new_tokens or serving.max_decode_tokens
        engine.check_decode_tokens(max_new_tokens)
        if (request.input is None) == (request.z is None):
            raise ApiError(400, "give exactly one of 'input' (texts) and 'z' (compression states)", param="input")
        rows: list[list[int]] = []
        if request.z is not None:
            states = engine.states_tensor(request.z)
        else:
            texts = input_texts(request.input)
            check_count(len(texts), serving.max_decode_inputs)
            rows = engine.tokenize(texts, engine.prompt(request), request.truncate)
        async with admission:
            if rows:
                encoded = await backend.run(engine.embed, rows)
                states = torch.from_numpy(np.stack([item.states for item in encoded]))
            started = time.perf_counter()
            outputs = await backend.run(engine.decode, states, max_new_tokens)
            metrics.inference_seconds.labels("decode").observe(time.perf_counter() - started)
        tokens = sum(len(row) for row in rows)
        metrics.inputs.labels("decode").inc(len(outputs))
        data = [{"object": "decoded_text", "text": text, "index": index} for index, text in enumerate(outputs)]
        return {"object": "list", "data": data, "model": backend.model_name, "usage": usage(tokens)}

    # Outermost first: count every response (errors from the guard included), then refuse early.
    guarded = EdgeGuard(api, backend.api_key, serving.max_payload_bytes, metrics)
    return RequestMetrics(guarded, metrics)  # type: ignore[return-value]


def check_count(count: int, limit: int) -> None:
    if count > limit:
        raise ApiError(413, f"{count} inputs is over this server's limit of {limit} per request", param="input",
                       code="too_many_inputs")


def error_response(err: ApiError, metrics: Metrics) -> JSONResponse:
    metrics.errors.labels(err.code).inc()
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers or None)


class Admission:
    """At most `limit` requests held by this replica at once; one more is answered 429 at once, not queued.

    Ray's own queue would hold it instead (and answer 503 in its own shape when full), so the deployment lets
    more requests in than this limit and this check decides.
    """

    def __init__(self, limit: int, metrics: Metrics):
        self.limit = limit
        self.pending = 0  # touched only on the replica's one event loop, so it needs no lock
        self.metrics = metrics

    async def __aenter__(self) -> None:
        if self.pending >= self.limit:
            err = ApiError(429, f"this replica already holds {self.limit} requests; retry shortly", code="server_overloaded")
            err.headers = {"Retry-After": "1"}
            raise err
        self.pending += 1
        self.metrics.pending.set(self.pending)

    async def __aexit__(self, *_exc: object) -> None:
        self.pending -= 1
        self.metrics.pending.set(self.pending)


def relative_path(scope: Scope) -> str:
    """The path under the application's route prefix (Ray Serve passes the prefix as root_path)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root) :] or "/"
    return path


class EdgeGuard:
    """Refuses before any parsing: a missing or wrong API key (401), then a body over the payload limit (413).

    The body is read here, up to the limit, and replayed to the app, so a client sending an endless chunked
    body costs at most max_body_bytes of memory.
    """

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int, metrics: Metrics):
        self.app, self.api_key, self.max_body_bytes, self.metrics = app, api_key, max_body_bytes, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.api_key and relative_path(scope) not in OPEN_ROUTES and not self._authorized(scope):
            err = ApiError(401, "a valid API key is required: send 'Authorization: Bearer <key>'", code="invalid_api_key")
            err.headers = {"WWW-Authenticate": "Bearer"}
            return await error_response(err, self.metrics)(scope, receive, send)
        declared = _header(scope, b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            return await self._too_large(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return await self._too_large(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        # The API reads only JSON, so a body sent without its content type (curl -d ...) is read as JSON too.
        headers = [(key, value) for key, value in scope.get("headers", ()) if key.lower() != b"content-type"]
        scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        return await self.app(scope, _replay(b"".join(chunks), receive), send)

    def _authorized(self, scope: Scope) -> bool:
        header = _header(scope, b"authorization") or ""
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        err = ApiError(413, f"the request body is over this server's limit of {self.max_body_bytes} bytes",
                       code="payload_too_large")
        await error_response(err, self.metrics)(scope, receive, send)


class RequestMetrics:
    """Counts every response by route and status, and times it."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = relative_path(scope)
        route = path if path in ROUTES else "other"  # unknown paths share a label, so labels stay few
        started, status = time.perf_counter(), [500]

        async def send_and_record(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.request_seconds.labels(route).observe(time.perf_counter() - started)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _replay(body: bytes, receive: Receive) -> Callable[[], Awaitable[Message]]:
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
