"""The generate stage: prompt rendering, length-grouped decoding, and the cached, resumable Ray Data pipeline."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from transformers import PreTrainedTokenizerFast

from components.backbone import build_byte_tokenizer, load_backbone
from components.generation import (
    GenerationError,
    cut_at_stop,
    decode_batch,
    generate_responses,
    kept_width,
    length_batches,
    render_prompt,
    shared_prefix_length,
    tokenize_prompts,
)
from components.spec import GenerationSpec, load_spec
from components.stages import FAIL_AT_SHARD_ENV, SUCCESS_FILE, ShardedOutput, StageError
from tests.conftest_ray import ray_local  # noqa: F401 - a fixture
from workflows import show_responses
from workflows.generate import plan_generate, run_generate

QUERIES = [
    "what is the capital of france", "who wrote hamlet", "hi", "why is the sky blue on a clear summer afternoon",
    "how many legs does a spider have", "what is two plus two", "name a prime number", "where do penguins live",
]


@pytest.fixture(scope="module")
def tiny():
    return load_backbone(load_spec("specs/tiny.yaml").backbone)


def generation(**settings) -> GenerationSpec:
    return GenerationSpec(**{"max_new_tokens": 10, "batch_size": 3, **settings})


def prompts_for(backbone, queries, settings):
    return tokenize_prompts(backbone.tokenizer, [render_prompt(backbone.tokenizer, q, settings) for q in queries])


def reference_answer(backbone, prompt: list[int], max_new_tokens: int) -> list[int]:
    """HF generate on one unpadded prompt: the ground truth for greedy decoding."""
    out = backbone.model.generate(
        torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=backbone.tokenizer.pad_token_id,
    )
    return out[0, len(prompt):].tolist()


# ------------------------------------------------------------------------------------------- pure helpers


def test_prompt_has_the_system_prompt_and_passes_enable_thinking_to_the_template():
    tokenizer: PreTrainedTokenizerFast = build_byte_tokenizer()
    # A Qwen3-like template: an empty think block when thinking is disabled.
    tokenizer.chat_template = tokenizer.chat_template + (
        "{% if add_generation_prompt and enable_thinking is defined and not enable_thinking %}"
        "{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    )
    off = render_prompt(tokenizer, "why?", generation(system_prompt="Be brief."))
    on = render_prompt(tokenizer, "why?", generation(enable_thinking=True))

    assert off.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nwhy?<|im_end|>")
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert "system" not in on and on.endswith("<|im_start|>assistant\n")


def test_a_tokenizer_without_chat_template_is_a_clear_error():
    tokenizer = build_byte_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(GenerationError, match="no chat template"):
        render_prompt(tokenizer, "why?", generation())


def test_length_batches_group_similar_lengths_and_cover_every_index_once():
    lengths = [5, 40, 7, 39, 6, 41, 8]
    batches = length_batches(lengths, 3)
    assert batches == [[5, 1, 3], [6, 2, 4], [0]]
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))


def test_shared_prefix_leaves_every_prompt_a_token_of_its_own():
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2
    assert shared_prefix_length([[7, 2], [1, 2]]) == 0 and shared_prefix_length([[1, 2, 3]]) == 0


def test_cut_at_stop_cuts_before_the_earliest_stop_string():
    assert cut_at_stop("answer.\nQ: next\n\nmore", ["\n\n", "Q:"]) == ("answer.\n", True)
    assert cut_at_stop("no stop here", ["###"]) == ("no stop here", False)


# ---------------------------------------------------------------------------------------------- decoding


def test_batched_left_padded_greedy_decoding_equals_generate_on_each_prompt_alone(tiny):
    settings = generation(max_new_tokens=12)
    prompts = prompts_for(tiny, QUERIES[:4], settings)
    assert len({len(p) for p in prompts}) > 1  # different lengths, so the batch is padded

    results = decode_batch(tiny.model, tiny.tokenizer, prompts, settings)

    for prompt, result in zip(prompts, results, strict=True):
        expected = tiny.tokenizer.decode(reference_answer(tiny, prompt, 12), skip_special_tokens=True)
        assert result.response == expected
        assert (result.prompt_tokens, result.response_tokens, result.finish_reason) == (len(prompt), 12, "length")


def test_a_row_stops_at_eos_and_the_batch_shrinks_without_changing_the_other_answers(tiny):
    settings = generation(max_new_tokens=10)
    prompts = prompts_for(tiny, QUERIES[:2], settings)
    free = decode_batch(tiny.model, tiny.tokenizer, prompts, settings)
    first_answer, second_answer = (reference_answer(tiny, prompt, 10) for prompt in prompts)
    # Make a token that row 0 writes (for the first time, after a few others) and row 1 never writes an end of sequence.
    stops_at = next(i for i, token in enumerate(first_answer)
                    if i >= 2 and first_answer.index(token) == i and token not in second_answer)
    eos = first_answer[stops_at]

    backbone = load_backbone(load_spec("specs/tiny.yaml").backbone)  # a private copy: its config is changed
    backbone.model.generation_config.eos_token_id = eos
    stopped = decode_batch(backbone.model, backbone.tokenizer, prompts, settings)

    assert stopped[0].finish_reason == "stop" and stopped[0].response_tokens == stops_at
    assert stopped[0].response == backbone.tokenizer.decode(first_answer[:stops_at], skip_special_tokens=True)
    # Half the batch finished, so it shrank to row 1 alone (its KV cache selected out): row 1's answer is the same.
    assert stopped[1] == free[1]


def test_the_batch_halves_only_when_at_most_half_of_it_is_still_answering():
    assert [kept_width(answering, 16) for answering in (16, 9, 8, 5, 4, 3, 2, 1)] == [16, 16, 8, 8, 4, 4, 2, 1]
    assert kept_width(2, 3) == 3 and kept_width(1, 3) == 1


def test_stop_strings_end_a_response_and_are_cut_from_it(tiny):
    settings = generation(max_new_tokens=12)
    prompts = prompts_for(tiny, QUERIES[:1], settings)
    text = decode_batch(tiny.model, tiny.tokenizer, prompts, settings)[0].response
    # A printable ASCII character at its first occurrence, past the start: the response must end just before it.
    cut = next(i for i, ch in enumerate(text) if i and ch.isascii() and ch.isprintable() and text.index(ch) == i)

    result = decode_batch(tiny.model, tiny.tokenizer, prompts, generation(max_new_tokens=12, stop=["#", text[cut]]))[0]
    assert result.response == text[:cut] and result.finish_reason == "stop" and result.response_tokens < 12


def test_generate_responses_returns_answers_in_query_order(tiny):
    settings = generation(max_new_tokens=6, batch_size=3)
    results = generate_responses(tiny.model, tiny.tokenizer, QUERIES, settings)
    for query, result in zip(QUERIES, results, strict=True):
        alone = generate_responses(tiny.model, tiny.tokenizer, [query], settings)[0]
        assert result == alone


def test_sampling_is_reproducible_for_a_seed(tiny):
    settings = generation(max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.9)
    first = generate_responses(tiny.model, tiny.tokenizer, QUERIES[:3], settings, seed=1)
    assert first == generate_responses(tiny.model, tiny.tokenizer, QUERIES[:3], settings, seed=1)
    assert first != generate_responses(tiny.model, tiny.tokenizer, QUERIES[:3], settings, seed=2)


# ----------------------------------------------------------------------------------------- stage outputs


def test_a_shard_must_hold_exactly_its_ids_and_the_output_completes_only_with_every_shard(tmp_path):
    output = ShardedOutput.open(tmp_path, {"stage": "test"}, num_rows=5, shard_size=2)
    assert output.num_shards == 3 and list(output.shard_ids(2)) == [4]

    output.write_shard(1, pa.table({"id": [3, 2], "x": ["d", "c"]}))  # any order in, id order on disk
    for wrong in ([2], [2, 3, 3], [0, 1]):
        with pytest.raises(StageError, match="shard 1 must hold ids 2..3 once each"):
            output.write_shard(1, pa.table({"id": wrong, "x": ["?"] * len(wrong)}))
    assert output.missing_shards() == [0, 2]
    with pytest.raises(StageError, match=r"incomplete, shards \[0, 2\] missing"):
        output.finish({})

    output.write_shard(0, pa.table({"id": [0, 1], "x": ["a", "b"]}))
    output.write_shard(2, pa.table({"id": [4], "x": ["e"]}))
    assert output.finish({"note": 1})["rows"] == 5 and output.complete
    assert output.read().column("x").to_pylist() == ["a", "b", "c", "d", "e"]
    assert not list(tmp_path.rglob("*.tmp"))
    # The same inputs find the same folder; other inputs another one.
    assert ShardedOutput.open(tmp_path, {"stage": "test"}, num_rows=5, shard_size=2).complete
    assert not ShardedOutput.open(tmp_path, {"stage": "other"}, num_rows=5, shard_size=2).complete


# -------------------------------------------------------------------------------------- the stage on Ray


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("generate")
    rows = [{"question": q} for q in QUERIES] + [{"question": ""}, {"question": None}, {"question": "x" * 3000}]
    (folder / "queries.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def stage_spec(workdir, *overrides):
    return load_spec("specs/tiny.yaml", [
        f"output_dir={workdir / 'run'}", f"data.sources=[{{path: {workdir / 'queries.jsonl'}, text_field: question}}]",
        "data.limit=null", "generation.max_new_tokens=6", "generation.batch_size=2", "generation.shard_size=3",
        *overrides,
    ])


def file_states(output: ShardedOutput) -> dict[str, tuple[int, int]]:
    return {path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in output.shard_paths() if path.is_file()}


@pytest.mark.usefixtures("ray_local")
def test_stage_writes_one_row_per_query_and_a_second_run_is_a_cache_hit(workdir, monkeypatch):
    spec = stage_spec(workdir)
    folder = run_generate(spec)

    output = ShardedOutput.load(folder)
    table = output.read()
    assert table.column_names == ["id", "query", "response", "prompt_tokens", "response_tokens", "finish_reason"]
    assert table.column("id").to_pylist() == list(range(8))
    assert sorted(table.column("query").to_pylist()) == sorted(QUERIES)
    assert set(table.column("finish_reason").to_pylist()) <= {"stop", "length"}
    assert all(0 <= n <= 6 for n in table.column("response_tokens").to_pylist())
    manifest = json.loads((folder / SUCCESS_FILE).read_text())
    assert manifest["rows"] == 8 and manifest["shards"] == 3
    assert manifest["data"]["skipped"] == {"empty": 1, "not_string": 1, "too_long": 1}

    # The same answers as the generator gives outside Ray.
    backbone = load_backbone(spec.backbone)
    query = table.column("query")[0].as_py()
    first = generate_responses(backbone.model, backbone.tokenizer, [query], spec.generation)[0]
    assert table.column("response")[0].as_py() == first.response

    before = file_states(output)

    def no_ray(*_args, **_kwargs):
        raise AssertionError("a cached stage must not run anything on Ray")

    monkeypatch.setattr(ray.data, "from_arrow", no_ray)
    # Execution settings are not part of the key: more actors or another batch size still hit the cache.
    assert run_generate(stage_spec(workdir, "generation.num_actors=2", "generation.batch_size=4")) == folder
    assert file_states(output) == before


def test_anything_that_changes_the_responses_changes_the_output_folder(workdir):
    base, _ = plan_generate(stage_spec(workdir))
    for override in ("generation.max_new_tokens=5", "generation.system_prompt=Be brief.", "generation.stop=['.']",
                     "backbone.random.seed=1", "data.limit=4"):
        assert plan_generate(stage_spec(workdir, override))[0].folder != base.folder, override


@pytest.mark.usefixtures("ray_local")
def test_a_run_that_dies_part_way_resumes_without_regenerating_losing_or_duplicating(workdir, monkeypatch):
    spec = stage_spec(workdir, "generation.shard_size=2", "generation.max_new_tokens=5")
    output, _ = plan_generate(spec)
    monkeypatch.setenv(FAIL_AT_SHARD_ENV, "3")
    with pytest.raises(Exception, match="FAIL_AT_SHARD"):
        run_generate(spec)

    assert not output.complete and 3 in output.missing_shards()
    survivors = file_states(output)
    assert survivors, "the failed run should have finished some shards"
    # A writer killed mid-write leaves only a temporary file, never a partial shard.
    (output.folder / ".shard-00003.parquet.dead.tmp").write_bytes(b"partial")

    monkeypatch.delenv(FAIL_AT_SHARD_ENV)
    folder = run_generate(spec)

    after = file_states(output)
    assert {name: after[name] for name in survivors} == survivors  # finished shards were not rewritten
    manifest = json.loads((folder / SUCCESS_FILE).read_text())
    assert manifest["shards_written_by_last_run"] == 4 - len(survivors)
    ids = output.read(columns=["id"]).column("id").to_pylist()
    assert ids == list(range(8))  # every query once: none lost, none twice
    assert not list(output.folder.glob(".*.tmp"))


@pytest.mark.usefixtures("ray_local")
def test_show_responses_prints_rendered_prompts_and_token_counts(workdir, capsys):
    spec_args = ["specs/tiny.yaml", "-n", "2", "--set", f"output_dir={workdir / 'run'}",
                 "--set", f"data.sources=[{{path: {workdir / 'queries.jsonl'}, text_field: question}}]",
                 "--set", "data.limit=null", "--set", "generation.max_new_tokens=6", "--set", "generation.batch_size=2",
                 "--set", "generation.shard_size=3"]
    run_generate(stage_spec(workdir))  # cached by the first stage test

    assert show_responses.main(spec_args) == 0
    printed = capsys.readouterr().out
    assert printed.count("--- id ") == 2 and "<|im_start|>user\n" in printed and "<|im_start|>assistant\n" in printed
    table = pq.read_table(ShardedOutput.load(run_generate(stage_spec(workdir))).shard_path(0))
    assert f"{table.column('prompt_tokens')[0].as_py()} prompt tokens" in printed


def test_vllm_backend_is_refused_with_a_clear_message(workdir):
    with pytest.raises(GenerationError, match="generation.backend: 'vllm'.*use backend: hf"):
        plan_generate(stage_spec(workdir, "generation.backend=vllm"))
