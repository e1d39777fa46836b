"""data.sources[].response_field: answers given by the data (the official generations) pass through the generate
stage without any decoding."""

from __future__ import annotations

import json

import pytest

from components.queries import QuerySelection, load_queries
from components.spec import SpecError, load_spec
from components.stages import ShardedOutput
from workflows.generate import run_generate

ROWS = [
    {"question": "what is the capital of france", "answer": "Paris is the capital of France."},
    {"question": "who wrote hamlet", "answer": "William Shakespeare wrote Hamlet."},
    {"question": "name a prime number", "answer": " 7 "},
    {"question": "a row without an answer"},
    {"question": "an answer that is not text", "answer": 42},
    {"question": "who wrote hamlet", "answer": "a duplicate query, dropped"},
    {"question": "what is two plus two", "answer": ""},
]


@pytest.fixture
def answered(tmp_path):
    path = tmp_path / "answered.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in ROWS) + "\n")
    return path


def spec_for(path, tmp_path, *more):
    source = f"[{{path: {path}, text_field: question, response_field: answer}}]"
    return load_spec("specs/tiny.yaml", [f"data.sources={source}", f"output_dir={tmp_path / 'run'}",
                                         "generation.shard_size=2", *more])


def test_the_generate_stage_passes_given_answers_through(answered, tmp_path, monkeypatch):
    # No model may decode: the generator actor is never built (it would need Ray and the backbone).
    monkeypatch.setattr("workflows.generate.ResponseGenerator", None)
    spec = spec_for(answered, tmp_path)
    folder = run_generate(spec)
    rows = ShardedOutput.load(folder).read().to_pylist()
    got = {row["query"]: row["response"] for row in rows}
    assert got == {"what is the capital of france": "Paris is the capital of France.",
                   "who wrote hamlet": "William Shakespeare wrote Hamlet.", "name a prime number": "7",
                   "what is two plus two": ""}
    assert {row["finish_reason"] for row in rows} == {"given"}
    assert all(row["prompt_tokens"] > 0 for row in rows)
    assert [row["response_tokens"] > 0 for row in rows if row["response"]] == [True] * 3
    manifest = json.loads((folder / "_SUCCESS.json").read_text())
    assert manifest["rows"] == 4 and manifest["finish_reasons"] == {"given": 4} and manifest["empty_responses"] == 1
    assert manifest["data"]["skipped"] == {"missing_field": 1, "not_string": 1, "duplicate": 1}
    assert run_generate(spec) == folder  # cached: the same inputs do no work


def test_answers_stay_with_their_queries_through_limit_and_shuffle(answered, tmp_path):
    selection = load_queries(spec_for(answered, tmp_path, "data.limit=3", "data.seed=5").data)
    truth = {row["question"]: row.get("answer") for row in ROWS[:3]} | {"what is two plus two": ""}
    assert len(selection.texts) == 3
    assert all(truth[query].strip() == answer for query, answer in zip(selection.texts, selection.responses, strict=True))


def test_given_answers_change_the_cache_key(answered, tmp_path):
    given = load_queries(spec_for(answered, tmp_path).data)
    assert given.digest() != QuerySelection(texts=given.texts, report=given.report).digest()
    other = QuerySelection(texts=given.texts, report=given.report, responses=[*given.responses[:-1], "changed"])
    assert other.digest() != given.digest()


def test_mixing_sources_with_and_without_answers_is_an_error(answered, tmp_path):
    sources = f"[{{path: {answered}, text_field: question, response_field: answer}}, {{path: {answered}, text_field: question}}]"
    with pytest.raises(SpecError, match="data: sources: either every source gives its answers"):
        load_spec("specs/tiny.yaml", [f"data.sources={sources}"])
