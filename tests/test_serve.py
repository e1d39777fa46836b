"""The serving application: pure request handling without Ray, then every route and error over loopback HTTP.

Ray Serve starts once for this module with two applications on the tiny model: `main` (small limits, no key)
at / and `guarded` (an API key, one request at a time) at /guarded.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import threading
import types
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray binds loopback only
# On 2 busy cores the HTTP proxy can miss Serve's default 5 s readiness check.
os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")

import requests  # noqa: E402
import yaml  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from components.model import LLM2VecGen  # noqa: E402
from components.spec import ServingSpec, SpecError, load_spec  # noqa: E402
from serve.app import AppArgs, default_model_name, deployment_options, resolve_model_dir, serving_settings  # noqa: E402
from serve.engine import EmbeddingEngine, split_by_token_budget  # noqa: E402
from serve.protocol import (  # noqa: E402
    ApiError,
    DecodeRequest,
    EmbeddingRequest,
    decode_base64,
    encode_base64,
    input_texts,
    shape_embedding,
    validation_error,
)

API_KEY_ENV = "LLM2VEC_GEN_TEST_API_KEY"
API_KEY = "test-key-0123456789"
MAIN_LIMITS = {
    "max_inputs_per_request": 4,
    "max_input_tokens": 32,
    "max_payload_bytes": 4096,
    "max_decode_tokens": 16,
    "max_batch_tokens": 120,  # small enough that a batch of long inputs is split into several passes
    "batch_wait_timeout_s": 0.05,  # wide enough that concurrent requests reliably share a batch
    "num_cpus": 0.5,
}
PROMPTS = {"query": "Answer: ", "document": "Summary: "}
GUARDED_LIMITS = {"api_key_env": API_KEY_ENV, "max_ongoing_requests": 1, "num_cpus": 0.5}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    spec = load_spec("specs/tiny.yaml")
    # Short prompts: the tiny tokenizer spends one token per byte, and the server's test limit is 32 tokens.
    spec = spec.model_copy(update={"model": spec.model.model_copy(update={"prompts": PROMPTS})})
    return LLM2VecGen.from_spec(spec, embedding_dim=16).save(tmp_path_factory.mktemp("serve") / "tiny-embedder")


@pytest.fixture(scope="module")
def model(model_dir) -> LLM2VecGen:
    """The same model as the server's, loaded in this process: what served vectors must equal."""
    return LLM2VecGen.load(model_dir)


# ================================================================================ pure parts, without Ray


def test_input_texts_accepts_a_string_or_a_list_and_refuses_empty_ones_with_400():
    assert input_texts("hi") == ["hi"]
    assert input_texts(["a", "b"]) == ["a", "b"]
    for bad, param in [("", "input"), ("   ", "input"), ([], "input"), (["ok", " "], "input[1]")]:
        with pytest.raises(ApiError) as caught:
            input_texts(bad)
        assert (caught.value.status, caught.value.param) == (400, param)


@pytest.mark.parametrize(
    "body, param, code",
    [
        ({"input": 5}, "input", "invalid_type"),
        ({"input": [1, 2]}, "input", "invalid_type"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format", "invalid_type"),
        ({"input": "x", "dimensions": 0}, "dimensions", "invalid_type"),
        ({"input": "x", "dimensions": "8"}, "dimensions", "invalid_type"),
        ({"input": "x", "truncate": "yes"}, "truncate", "invalid_type"),
        ({"input": "x", "inputs": ["y"]}, "inputs", "unknown_field"),
        ({}, "input", "missing_field"),
    ],
)
def test_request_validation_maps_to_422_naming_the_field(body, param, code):
    with pytest.raises(ValidationError) as caught:
        EmbeddingRequest.model_validate(body)
    err = validation_error(caught.value.errors())
    assert (err.status, err.param, err.code) == (422, param, code)
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}


def test_decode_request_takes_z_as_numbers_only():
    assert DecodeRequest.model_validate({"z": [[1, 2.5]]}).z == [[1.0, 2.5]]
    with pytest.raises(ValidationError):
        DecodeRequest.model_validate({"z": [["1.0"]]})


def test_base64_is_little_endian_float32_as_openai_sends_it():
    vector = np.array([1.0, -2.5, 0.1], dtype=np.float32)
    text = encode_base64(vector)
    import base64

    assert base64.b64decode(text) == struct.pack("<3f", 1.0, -2.5, np.float32(0.1))
    assert np.array_equal(decode_base64(text), vector)


def test_dimensions_truncate_then_renormalise():
    vector = np.array([3.0, 4.0, 12.0], dtype=np.float32)
    assert np.allclose(shape_embedding(vector, 2, normalize=True), [0.6, 0.8])
    assert np.allclose(shape_embedding(vector, None, normalize=True), vector / 13)
    assert np.allclose(shape_embedding(vector, 2, normalize=False), [3.0, 4.0])


def test_token_budget_split_keeps_every_pass_under_budget_and_every_input_once():
    lengths = [5, 40, 12, 3, 33, 8, 20, 1]
    groups = split_by_token_budget(lengths, max_batch_tokens=60, extra_tokens=5, pass_cost_tokens=30)
    assert sorted(i for group in groups for i in group) == list(range(len(lengths)))
    for group in groups:
        assert len(group) * (max(lengths[i] for i in group) + 5) <= 60
        assert [lengths[i] for i in group] == sorted((lengths[i] for i in group), reverse=True)
    assert len(groups) > 1


def test_token_budget_split_runs_an_oversized_input_alone_and_a_large_budget_in_one_pass():
    assert split_by_token_budget([100, 2, 3], max_batch_tokens=50, pass_cost_tokens=10) == [[0], [2, 1]]
    assert split_by_token_budget([4, 9, 2], max_batch_tokens=10_000, pass_cost_tokens=10) == [[1, 0, 2]]


def test_token_budget_split_keeps_short_texts_out_of_a_long_texts_padding():
    lengths = [150, 10, 12, 150, 11, 10, 9, 150]
    groups = split_by_token_budget(lengths, max_batch_tokens=8192, extra_tokens=20, pass_cost_tokens=64)
    assert [sorted(lengths[i] for i in group) for group in groups] == [[150, 150, 150], [9, 10, 10, 11, 12]]
    # When a pass costs more than the padding it would save, everything shares one pass.
    assert len(split_by_token_budget(lengths, max_batch_tokens=8192, extra_tokens=20, pass_cost_tokens=10_000)) == 1


def test_engine_vectors_equal_encode_whatever_the_token_budget(model):
    texts = ["how do vaccines work?", "a", "the quick brown fox jumps over the lazy dog", "what is 2+2"]
    expected = model.encode(texts, normalize=True, prompt="Q: ")
    for budget in (1, 64, 100_000):
        engine = EmbeddingEngine(model, ServingSpec(max_batch_tokens=budget))
        rows = engine.tokenize(texts, "Q: ", truncate=False)
        vectors = np.stack([shape_embedding(item.embedding, None, True) for item in engine.embed(rows)])
        assert np.allclose(vectors, expected, atol=1e-5)


def test_a_replica_can_load_the_backbone_in_another_precision(model_dir, model):
    # serving.dtype: a model trained in float32 on a CPU, served in bfloat16 (as on a GPU): the same weights
    # rounded, so the fingerprint check passes and the vectors stay close to the float32 ones.
    texts = ["how do vaccines work?", "the quick brown fox jumps over the lazy dog"]
    half = LLM2VecGen.load(model_dir, dtype="bfloat16")
    assert half.backbone.get_input_embeddings().weight.dtype == torch.bfloat16
    assert half.backbone_info.spec.dtype == "bfloat16" and model.backbone_info.spec.dtype == "float32"
    assert half.special_embeddings.dtype == torch.float32  # the trained rows keep their precision
    cosine = (half.encode(texts, normalize=True) * model.encode(texts, normalize=True)).sum(-1)
    assert (cosine > 0.98).all(), cosine
    with pytest.raises(ValidationError, match="dtype"):
        ServingSpec(dtype="bfloat8")


def test_engine_refuses_long_inputs_unless_truncating_and_caps_the_limit_at_the_model(model):
    engine = EmbeddingEngine(model, ServingSpec(max_input_tokens=10_000))
    assert engine.max_input_tokens == model.config.max_query_tokens  # 64 for the tiny spec
    engine = EmbeddingEngine(model, ServingSpec(max_input_tokens=8))
    with pytest.raises(ApiError) as caught:
        engine.tokenize(["short", "x" * 9], "", truncate=False)
    assert (caught.value.status, caught.value.param, caught.value.code) == (413, "input[1]", "input_too_long")
    assert [len(row) for row in engine.tokenize(["short", "x" * 9], "", truncate=True)] == [5, 8]


def test_engine_refuses_texts_spelling_out_the_models_own_tokens(model):
    engine = EmbeddingEngine(model, ServingSpec())
    with pytest.raises(ApiError) as caught:
        engine.tokenize(["fine", f"sneaky {model.config.special_tokens[-1]}"], "", truncate=False)
    assert (caught.value.status, caught.value.param) == (400, "input[1]")


def test_engine_prompt_is_an_instruction_or_a_named_prompt_not_both(model):
    engine = EmbeddingEngine(model, ServingSpec())
    assert engine.prompt(EmbeddingRequest(input="x")) == ""
    assert engine.prompt(EmbeddingRequest(input="x", instruction="Answer: ")) == "Answer: "
    assert engine.prompt(EmbeddingRequest(input="x", prompt_name="query")) == model.config.prompts["query"]
    for fields in ({"prompt_name": "nope"}, {"prompt_name": "query", "instruction": "x"}):
        with pytest.raises(ApiError) as caught:
            engine.prompt(EmbeddingRequest(input="x", **fields))
        assert caught.value.status == 400


def test_engine_checks_z_shape_and_values(model):
    engine = EmbeddingEngine(model, ServingSpec())
    compression, hidden = engine.states_shape
    assert engine.states_tensor([[0.0] * hidden] * compression).shape == (1, compression, hidden)
    for bad in ([[0.0] * hidden] * (compression + 1), [[0.0] * (hidden - 1)] * compression, [],
                [[float("nan")] * hidden] * compression):
        with pytest.raises(ApiError) as caught:
            engine.states_tensor(bad)
        assert (caught.value.status, caught.value.param) == (400, "z")


def test_deployment_options_come_from_the_serving_section():
    fixed = deployment_options(ServingSpec(num_replicas=2, num_cpus=3, num_gpus=1, max_ongoing_requests=10))
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 3, "num_gpus": 1}
    assert fixed["max_ongoing_requests"] > 10  # so the app, not Ray's queue, answers the overflow (429)
    scaled = deployment_options(ServingSpec(num_replicas=1, max_replicas=4, target_ongoing_requests=8))
    assert "num_replicas" not in scaled
    assert scaled["autoscaling_config"]["min_replicas"] == 1 and scaled["autoscaling_config"]["max_replicas"] == 4
    with pytest.raises(ValidationError):
        ServingSpec(num_replicas=3, max_replicas=2)


def test_serving_settings_start_from_the_spec_and_apply_overrides():
    settings = serving_settings(AppArgs(model="m", spec="specs/tiny.yaml", serving={"max_batch_size": 1}))
    assert settings.max_batch_size == 1 and settings.host == "127.0.0.1"
    with pytest.raises(SpecError, match="max_batch_sizee"):
        serving_settings(AppArgs(model="m", serving={"max_batch_sizee": 1}))
    with pytest.raises(ValidationError):
        AppArgs.model_validate({"model": "m", "replicas": 2})


def test_the_serve_config_file_builds_valid_settings():
    config = yaml.safe_load(open("serve/config.yaml"))
    assert config["http_options"]["host"] == "127.0.0.1"
    (application,) = config["applications"]
    assert application["import_path"] == "serve.app:build_app"
    settings = serving_settings(AppArgs.model_validate(application["args"]))
    assert settings.host == "127.0.0.1" and settings.max_replicas >= settings.num_replicas


def test_registered_models_are_downloaded_through_the_registry(monkeypatch, tmp_path):
    # A stand-in for the MLflow download (components.tracking, issue 4): this checks the call, not MLflow.
    calls = []
    tracking = types.ModuleType("components.tracking")
    tracking.download_registered_model = lambda uri: calls.append(uri) or tmp_path
    monkeypatch.setitem(sys.modules, "components.tracking", tracking)
    assert resolve_model_dir("models:/my-embedder/3") == tmp_path and calls == ["models:/my-embedder/3"]
    assert resolve_model_dir(str(tmp_path)) == tmp_path and len(calls) == 1
    assert default_model_name("models:/my-embedder/3") == "my-embedder"
    assert default_model_name("/runs/x/my-folder") == "my-folder"


# ============================================================================ the application over loopback


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(model_dir):
    import ray
    from ray import serve

    from serve.app import build_app

    os.environ[API_KEY_ENV] = API_KEY  # before ray.init, so that replica processes inherit it
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app({"model": str(model_dir), "serving": MAIN_LIMITS}), name="main", route_prefix="/")
        serve.run(build_app({"model": str(model_dir), "serving": GUARDED_LIMITS}), name="guarded",
                  route_prefix="/guarded")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        if started_ray:
            ray.shutdown()
        os.environ.pop(API_KEY_ENV, None)


def post(server, path, body, **kwargs):
    return requests.post(f"{server}{path}", json=body, timeout=60, **kwargs)


def assert_error(response, status, param=None, code=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


def embeddings_of(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array([item["embedding"] for item in response.json()["data"]], dtype=np.float32)


TEXTS = ["how do vaccines work?", "who wrote hamlet", "the capital of france"]


def test_embeddings_equal_model_encode_in_the_openai_shape(server, model):
    response = post(server, "/v1/embeddings", {"input": TEXTS, "model": "tiny-embedder", "user": "someone"})
    body = response.json()
    assert body["object"] == "list" and body["model"] == "tiny-embedder"
    assert [(item["object"], item["index"]) for item in body["data"]] == [("embedding", i) for i in range(3)]
    assert np.allclose(embeddings_of(response), model.encode(TEXTS, normalize=True), atol=1e-5)
    tokens = sum(len(ids) for ids in model.tokenizer(TEXTS)["input_ids"])
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


def test_a_single_string_gives_one_embedding(server, model):
    vectors = embeddings_of(post(server, "/v1/embeddings", {"input": TEXTS[0]}))
    assert vectors.shape == (1, 16) and np.allclose(vectors[0], model.encode(TEXTS[0], normalize=True), atol=1e-5)


def test_named_prompts_and_free_instructions_prefix_the_input(server, model):
    named = embeddings_of(post(server, "/v1/embeddings", {"input": TEXTS, "prompt_name": "query"}))
    assert np.allclose(named, model.encode(TEXTS, normalize=True, prompt_name="query"), atol=1e-5)
    free = embeddings_of(post(server, "/v1/embeddings", {"input": TEXTS, "instruction": "Q: "}))
    assert np.allclose(free, model.encode(TEXTS, normalize=True, prompt="Q: "), atol=1e-5)
    assert not np.allclose(named, free, atol=1e-3)


def test_base64_encoding_carries_the_same_vectors(server):
    floats = embeddings_of(post(server, "/v1/embeddings", {"input": TEXTS}))
    response = post(server, "/v1/embeddings", {"input": TEXTS, "encoding_format": "base64"})
    decoded = np.stack([decode_base64(item["embedding"]) for item in response.json()["data"]])
    assert np.array_equal(decoded, floats)


def test_dimensions_truncate_and_renormalise_or_are_refused(server, model):
    short = embeddings_of(post(server, "/v1/embeddings", {"input": TEXTS, "dimensions": 8}))
    raw = model.encode(TEXTS)
    expected = raw[:, :8] / np.linalg.norm(raw[:, :8], axis=1, keepdims=True)
    assert short.shape == (3, 8) and np.allclose(short, expected, atol=1e-5)
    assert_error(post(server, "/v1/embeddings", {"input": "x", "dimensions": 17}), 400, "dimensions")
    assert_error(post(server, "/v1/embeddings", {"input": "x", "dimensions": 0}), 422, "dimensions")


def test_concurrent_requests_are_batched_and_each_gets_its_own_vector(server, model):
    texts = [f"question {i}{' why' * (i % 5)}" for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda text: post(server, "/v1/embeddings", {"input": text}), texts))
    vectors = np.concatenate([embeddings_of(response) for response in responses])
    assert np.allclose(vectors, model.encode(texts, normalize=True), atol=1e-5)
    metrics = requests.get(f"{server}/metrics", timeout=30).text
    passes = _metric(metrics, "llm2vec_batch_size_count")
    assert passes < _metric(metrics, "llm2vec_batch_size_sum")  # some pass held more than one text


def test_a_collected_batch_is_split_by_the_token_budget(server, model):
    # 4 inputs of 30 tokens (+5 special) cannot share one pass of 120 padded tokens.
    texts = ["abcdefghij" * 3, "klmnopqrst" * 3, "uvwxyzabcd" * 3, "0123456789" * 3]
    before = _metric(requests.get(f"{server}/metrics", timeout=30).text, "llm2vec_batch_tokens_bucket", 'le="128.0"')
    vectors = embeddings_of(post(server, "/v1/embeddings", {"input": texts}))
    assert np.allclose(vectors, model.encode(texts, normalize=True), atol=1e-5)
    after = _metric(requests.get(f"{server}/metrics", timeout=30).text, "llm2vec_batch_tokens_bucket", 'le="128.0"')
    assert after - before >= 2


def test_truncate_cuts_a_long_input_to_the_token_limit(server, model):
    long_text = "abcdefgh" * 10  # 80 byte tokens, over the limit of 32
    assert_error(post(server, "/v1/embeddings", {"input": ["ok", long_text]}), 413, "input[1]", "input_too_long")
    response = post(server, "/v1/embeddings", {"input": long_text, "truncate": True})
    assert np.allclose(embeddings_of(response)[0], model.encode(long_text[:32], normalize=True), atol=1e-5)
    assert response.json()["usage"]["prompt_tokens"] == 32


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"input": ""}, 400, "input"),
        ({"input": []}, 400, "input"),
        ({"input": ["fine", ""]}, 400, "input[1]"),
        ({"input": 42}, 422, "input"),
        ({"input": [1, 2, 3]}, 422, "input"),
        ({"input": "x", "colour": "blue"}, 422, "colour"),
        ({"input": "x", "encoding_format": "int8"}, 422, "encoding_format"),
        ({"input": ["a", "b", "c", "d", "e"]}, 413, "input"),
        ({"input": "x", "prompt_name": "nope"}, 400, "prompt_name"),
        ({"input": "x", "prompt_name": "query", "instruction": "y"}, 400, "prompt_name"),
        ({"input": "x", "model": "text-embedding-3-small"}, 404, "model"),
        ({"input": "a <|llm2vec_compress_0|>"}, 400, "input[0]"),
    ],
)
def test_bad_embedding_requests_get_openai_errors_not_500(server, body, status, param):
    assert_error(post(server, "/v1/embeddings", body), status, param)


def test_malformed_or_oversized_bodies_are_refused_before_parsing(server):
    headers = {"Content-Type": "application/json"}
    assert_error(requests.post(f"{server}/v1/embeddings", data=b"{not json", headers=headers, timeout=30), 400)
    assert_error(requests.post(f"{server}/v1/embeddings", data=b"[1, 2]", headers=headers, timeout=30), 422)
    big = {"input": ["word " * 900]}  # ~4.5 kB, over the 4096-byte limit
    assert_error(post(server, "/v1/embeddings", big), 413, code="payload_too_large")
    chunks = (b'{"input": "' + b"x" * 1000 for _ in range(6))  # chunked: no Content-Length to trust
    assert_error(requests.post(f"{server}/v1/embeddings", data=chunks, headers=headers, timeout=30), 413)


def test_a_json_body_without_its_content_type_is_still_read_as_json(server, model):
    body = json.dumps({"input": TEXTS[0]})  # what `curl -d` sends, as application/x-www-form-urlencoded
    response = requests.post(f"{server}/v1/embeddings", data=body,
                             headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=30)
    assert np.allclose(embeddings_of(response)[0], model.encode(TEXTS[0], normalize=True), atol=1e-5)


def test_unknown_routes_and_methods_answer_in_the_same_error_shape(server):
    assert_error(requests.get(f"{server}/v1/nothing", timeout=30), 404)
    assert_error(requests.get(f"{server}/v1/embeddings", timeout=30), 405)


def test_decode_of_a_text_equals_model_decode(server, model):
    response = post(server, "/v1/decode", {"input": ["how do vaccines work?", "hello"], "max_new_tokens": 8})
    assert response.status_code == 200, response.text
    texts = [item["text"] for item in response.json()["data"]]
    assert texts == model.decode(["how do vaccines work?", "hello"], max_new_tokens=8)


def test_decode_of_returned_states_gives_the_texts_decode(server, model):
    item = post(server, "/v1/embeddings", {"input": "who wrote hamlet", "include_states": True}).json()["data"][0]
    assert np.array(item["states"]).shape == (model.config.compression_tokens, model.config.hidden_size)
    response = post(server, "/v1/decode", {"z": item["states"], "max_new_tokens": 8})
    assert response.status_code == 200, response.text
    assert response.json()["data"][0]["text"] == model.decode("who wrote hamlet", max_new_tokens=8)
    z = torch.tensor(item["states"])
    assert response.json()["data"][0]["text"] == model.decode(z, max_new_tokens=8)


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"input": "x", "max_new_tokens": 17}, 400, "max_new_tokens"),
        ({"input": "x", "max_new_tokens": 0}, 422, "max_new_tokens"),
        ({"max_new_tokens": 4}, 400, "input"),
        ({"input": "x", "z": [[0.0]]}, 400, "input"),
        ({"z": [[0.0] * 64] * 2}, 400, "z"),
        ({"z": [["a"] * 64] * 3}, 422, None),
        ({"input": ["x"] * 9}, 413, "input"),
        ({"input": ""}, 400, "input"),
    ],
)
def test_bad_decode_requests_get_openai_errors_not_500(server, body, status, param):
    assert_error(post(server, "/v1/decode", body), status, param)


def test_health_models_info_and_metrics(server, model):
    assert requests.get(f"{server}/health", timeout=30).json() == {"status": "ok"}
    models = requests.get(f"{server}/v1/models", timeout=30).json()
    assert models["object"] == "list" and [entry["id"] for entry in models["data"]] == ["tiny-embedder"]
    info = requests.get(f"{server}/info", timeout=30).json()
    assert info["embedding_dim"] == 16 and info["backbone"]["hidden_size"] == model.config.hidden_size
    assert (info["thought_tokens"], info["compression_tokens"]) == (2, 3)
    assert info["limits"]["max_input_tokens"] == 32 and info["limits"]["max_inputs_per_request"] == 4
    assert info["backbone"]["fingerprint"] == model.config.backbone_fingerprint[:16]
    metrics = requests.get(f"{server}/metrics", timeout=30)
    assert metrics.headers["content-type"].startswith("text/plain")
    for name in ("llm2vec_requests_total", "llm2vec_errors_total", "llm2vec_batch_size_bucket",
                 "llm2vec_queue_seconds_bucket", "llm2vec_inference_seconds_bucket"):
        assert name in metrics.text
    assert _metric(metrics.text, "llm2vec_requests_total", 'route="/health",status="200"') >= 1


def test_bad_requests_never_restart_the_replica(server):
    # Runs after the error tests: the replica that answered them is still the one answering now.
    first = requests.get(f"{server}/info", timeout=30).json()
    for body in ({"input": None}, {"input": "x" * 5000}, {"input": {"a": 1}}, {"input": "x", "dimensions": -1}):
        assert post(server, "/v1/embeddings", body).status_code in (400, 413, 422)
    errors = _metric(requests.get(f"{server}/metrics", timeout=30).text, "llm2vec_requests_total",
                     'route="/v1/embeddings",status="500"')
    assert errors == 0
    assert requests.get(f"{server}/info", timeout=30).json()["replica"] == first["replica"]


def test_api_key_is_required_when_configured_except_for_health(server):
    guarded = f"{server}/guarded"
    assert requests.get(f"{guarded}/health", timeout=30).status_code == 200
    assert_error(requests.get(f"{guarded}/v1/models", timeout=30), 401, code="invalid_api_key")
    wrong = {"Authorization": "Bearer not-the-key"}
    assert_error(post(guarded, "/v1/embeddings", {"input": "x"}, headers=wrong), 401)
    right = {"Authorization": f"Bearer {API_KEY}"}
    assert post(guarded, "/v1/embeddings", {"input": "x"}, headers=right).status_code == 200
    # The unguarded app needs no key.
    assert requests.get(f"{server}/v1/models", timeout=30).status_code == 200


def test_overload_is_answered_429_and_the_replica_keeps_serving(server):
    guarded, headers = f"{server}/guarded", {"Authorization": f"Bearer {API_KEY}"}
    body = {"input": "tell me a long story", "max_new_tokens": 64}
    barrier = threading.Barrier(12)

    def call(_):
        barrier.wait()
        return post(guarded, "/v1/decode", body, headers=headers)

    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(call, range(12)))
    statuses = sorted(response.status_code for response in responses)
    assert set(statuses) == {200, 429}, statuses
    refused = next(response for response in responses if response.status_code == 429)
    assert_error(refused, 429, code="server_overloaded")
    assert refused.headers.get("retry-after") == "1"
    assert post(guarded, "/v1/embeddings", {"input": "still here"}, headers=headers).status_code == 200


def _metric(text: str, name: str, labels: str = "") -> float:
    """The sum of a metric's samples whose labels contain `labels` (0 when there are none)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {") and labels in line:
            total += float(line.rsplit(" ", 1)[1])
    return total
