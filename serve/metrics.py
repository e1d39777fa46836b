"""Prometheus metrics of one replica, served as text at GET /metrics.

Each replica keeps its own registry: a scrape through the HTTP proxy reaches one replica, so with several
replicas scrape each one (or use Ray's metrics export) to see the whole deployment.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: F401  (re-exported for the API)
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_TOKENS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


class Metrics:
    def __init__(self) -> None:
        disable_created_metrics()  # the *_created series double the text and say nothing a scrape needs
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter(
            "llm2vec_requests", "HTTP requests by route and status code", ["route", "status"], registry=registry
        )
        self.errors = Counter("llm2vec_errors", "Error responses by code", ["code"], registry=registry)
        self.request_seconds = Histogram(
            "llm2vec_request_seconds", "Time from request to response", ["route"], buckets=_SECONDS, registry=registry
        )
        self.inputs = Counter("llm2vec_inputs", "Texts embedded or decoded", ["route"], registry=registry)
        self.prompt_tokens = Counter("llm2vec_prompt_tokens", "Input tokens read, instructions included", registry=registry)
        self.batch_size = Histogram(
            "llm2vec_batch_size", "Texts per forward pass (across requests)", buckets=_SIZES, registry=registry
        )
        self.batch_tokens = Histogram(
            "llm2vec_batch_tokens", "Padded tokens per forward pass", buckets=_TOKENS, registry=registry
        )
        self.queue_seconds = Histogram(
            "llm2vec_queue_seconds", "Time an input waits for its batch to start", buckets=_SECONDS, registry=registry
        )
        self.inference_seconds = Histogram(
            "llm2vec_inference_seconds", "Time of one forward pass (or one decode call)", ["kind"],
            buckets=_SECONDS, registry=registry,
        )
        self.pending = Gauge("llm2vec_pending_requests", "Requests this replica holds now", registry=registry)

    def observe_pass(self, rows: int, padded_tokens: int, seconds: float) -> None:
        self.batch_size.observe(rows)
        self.batch_tokens.observe(padded_tokens)
        self.inference_seconds.labels("embed").observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
