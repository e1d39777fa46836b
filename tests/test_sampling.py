"""Sampled generation: transformers' logits shaping, the configured distribution, per-row seeds, the model's own
generation_config (generation.sampling: model_default), and no (B, V) tensor leaving the model's device."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from components.backbone import load_backbone
from components.generation import (
    Sampling,
    decode_batch,
    generate_responses,
    next_tokens,
    render_prompt,
    resolve_sampling,
    shape_logits,
    tokenize_prompts,
)
from components.spec import GenerationSpec, SpecError, load_spec, validate_spec

SAMPLED = Sampling(do_sample=True, temperature=0.7, top_p=0.9, top_k=12, min_p=0.02, repetition_penalty=1.3)


@pytest.fixture(scope="module")
def tiny():
    return load_backbone(load_spec("specs/tiny.yaml").backbone)


def transformers_scores(logits: torch.Tensor, input_ids: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    processors = LogitsProcessorList([
        RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty), TemperatureLogitsWarper(sampling.temperature),
        TopKLogitsWarper(sampling.top_k), TopPLogitsWarper(sampling.top_p), MinPLogitsWarper(sampling.min_p),
    ])
    return processors(input_ids, logits.clone())


def test_logits_are_shaped_as_transformers_generate_shapes_them():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 300, generator=generator) * 3
    input_ids = torch.randint(0, 300, (6, 25), generator=generator)
    seen = torch.zeros(6, 300, dtype=torch.bool).scatter(1, input_ids, True)
    ours, reference = shape_logits(logits, SAMPLED, seen), transformers_scores(logits, input_ids, SAMPLED)
    assert torch.equal(torch.isinf(ours), torch.isinf(reference))
    torch.testing.assert_close(ours[~torch.isinf(ours)], reference[~torch.isinf(reference)])
    assert (~torch.isinf(ours)).sum(-1).max() <= SAMPLED.top_k  # something was cut


def test_greedy_takes_the_argmax_of_the_penalised_logits():
    logits = torch.tensor([[2.0, 1.9, -1.0]])
    seen = torch.tensor([[True, False, False]])
    greedy = Sampling(repetition_penalty=1.2)
    assert next_tokens(shape_logits(logits, greedy, seen), greedy).item() == 1  # 2.0 / 1.2 < 1.9
    assert next_tokens(shape_logits(logits, Sampling(), seen), Sampling()).item() == 0


def test_the_draw_is_exact_inverse_cdf():
    scores = torch.log(torch.tensor([[0.5, 0.0, 0.25, 0.25]]))
    draws = [next_tokens(scores, SAMPLED, torch.tensor([u])).item() for u in (0.0, 0.49, 0.5, 0.74, 0.75, 0.999999)]
    assert draws == [0, 0, 2, 2, 3, 3]  # the zero-probability token is never drawn


def test_token_frequencies_of_a_fixed_prompt_follow_the_configured_distribution(tiny):
    settings = GenerationSpec(max_new_tokens=1, batch_size=500, do_sample=True, temperature=0.8, top_k=12, top_p=0.9)
    sampling = resolve_sampling(settings)
    [prompt] = tokenize_prompts(tiny.tokenizer, [render_prompt(tiny.tokenizer, "why is the sky blue", settings)])
    with torch.no_grad():
        logits = tiny.model(torch.tensor([prompt])).logits[:, -1]
    expected_by_token = shape_logits(logits, sampling).softmax(-1)[0]
    expected: Counter = Counter()  # by the text a token decodes to (EOS gives an empty answer)
    for token in expected_by_token.nonzero().flatten().tolist():
        expected[tiny.tokenizer.decode([token], skip_special_tokens=True)] += expected_by_token[token].item()
    assert 3 <= len(expected) <= 12
    count = 4000
    results = decode_batch(tiny.model, tiny.tokenizer, [prompt] * count, settings, seeds=range(count))
    observed = Counter(result.response for result in results)
    assert set(observed) <= set(expected)  # nothing outside top-k / top-p is ever drawn
    distance = 0.5 * sum(abs(observed[text] / count - p) for text, p in expected.items())
    assert distance < 0.035, (distance, observed, expected)  # sampling noise at 4,000 draws: ~0.015


def test_a_row_answers_the_same_for_the_same_seed_whatever_its_batch(tiny):
    queries = ["what is the capital of france", "who wrote hamlet", "hi", "why is the sky blue", "name a prime"]
    settings = GenerationSpec(max_new_tokens=8, batch_size=5, do_sample=True, temperature=1.5)
    ids = [100, 101, 102, 103, 104]
    first = generate_responses(tiny.model, tiny.tokenizer, queries, settings, seed=7, ids=ids)
    again = generate_responses(tiny.model, tiny.tokenizer, queries, settings, seed=7, ids=ids)
    assert first == again  # a re-run (or a resumed shard) writes the same answers
    # One row at a time, or only the last rows (as a resumed shard of another size would), gives the same answers.
    alone = generate_responses(tiny.model, tiny.tokenizer, queries, settings.model_copy(update={"batch_size": 1}), 7, ids)
    tail = generate_responses(tiny.model, tiny.tokenizer, queries[2:], settings, seed=7, ids=ids[2:])
    assert alone == first and tail == first[2:]
    other_seed = generate_responses(tiny.model, tiny.tokenizer, queries, settings, seed=8, ids=ids)
    assert other_seed != first  # the draws do depend on the seed


def test_model_default_takes_the_backbones_generation_config():
    qwen3 = GenerationConfig(do_sample=True, temperature=0.6, top_p=0.95, top_k=20)
    settings = GenerationSpec(sampling="model_default")
    assert resolve_sampling(settings, qwen3) == Sampling(do_sample=True, temperature=0.6, top_p=0.95, top_k=20)
    greedy_config = GenerationConfig(repetition_penalty=1.05)
    assert resolve_sampling(settings, greedy_config) == Sampling(repetition_penalty=1.05)


def test_model_default_sampling_decodes_with_the_backbones_config(tiny):
    backbone = load_backbone(load_spec("specs/tiny.yaml").backbone)  # a private copy: its config is changed
    backbone.model.generation_config.update(do_sample=True, temperature=0.6, top_k=5)
    queries = ["what is the capital of france", "who wrote hamlet"]
    default = generate_responses(backbone.model, backbone.tokenizer, queries, GenerationSpec(max_new_tokens=6,
                                 sampling="model_default"), seed=3)
    explicit = generate_responses(backbone.model, backbone.tokenizer, queries, GenerationSpec(max_new_tokens=6,
                                  do_sample=True, temperature=0.6, top_k=5), seed=3)
    assert default == explicit


def test_model_default_with_explicit_sampling_keys_is_an_error():
    data = load_spec("specs/tiny.yaml").to_dict()
    data["generation"] |= {"sampling": "model_default", "temperature": 0.3}
    with pytest.raises(SpecError, match="generation: sampling: model_default takes temperature from the backbone"):
        validate_spec(data)
    data["generation"]["temperature"] = 1.0  # the default, as a dumped spec holds it: fine
    assert validate_spec(data).generation.sampling == "model_default"


def test_sampling_never_moves_the_distribution_off_the_device():
    # On the meta device a tensor has no data: copying one to the host (as `probs.cpu()` for torch.multinomial did)
    # raises, so getting token ids back proves that the draw stays where the logits are.
    logits = torch.randn(4, 1000, device="meta")
    seen = torch.zeros(4, 1000, dtype=torch.bool, device="meta")
    tokens = next_tokens(shape_logits(logits, SAMPLED, seen), SAMPLED, torch.rand(4, dtype=torch.float64, device="meta"))
    assert tokens.device.type == "meta" and tokens.shape == (4,)
    with pytest.raises(NotImplementedError):
        torch.multinomial(logits.softmax(-1).cpu(), 1)



@pytest.mark.slow
def test_smollm2_model_default_sampling_follows_its_generation_config(smollm2_spec):
    # SmolLM2's own file asks for greedy decoding; given Qwen3's published sampling settings, model_default must draw
    # the first answer token from exactly the distribution they define on SmolLM2's logits.
    backbone = load_backbone(smollm2_spec.backbone)
    backbone.model.generation_config.update(do_sample=True, temperature=0.6, top_p=0.95, top_k=20)
    settings = GenerationSpec(sampling="model_default", max_new_tokens=1, batch_size=250)
    sampling = resolve_sampling(settings, backbone.model.generation_config)
    assert sampling == Sampling(do_sample=True, temperature=0.6, top_p=0.95, top_k=20)
    [prompt] = tokenize_prompts(backbone.tokenizer, [render_prompt(backbone.tokenizer, "Name a colour.", settings)])
    with torch.no_grad():
        logits = backbone.model(torch.tensor([prompt])).logits[:, -1]
    expected = shape_logits(logits, sampling).softmax(-1)[0]
    count = 1000
    results = decode_batch(backbone.model, backbone.tokenizer, [prompt] * count, settings, seeds=range(count))
    observed: Counter = Counter()
    for result in results:
        observed[result.response] += 1
    by_text: Counter = Counter()
    for token in expected.nonzero().flatten().tolist():
        by_text[backbone.tokenizer.decode([token], skip_special_tokens=True)] += expected[token].item()
    assert set(observed) <= set(by_text)
    distance = 0.5 * sum(abs(observed[text] / count - p) for text, p in by_text.items())
    print(f"SmolLM2 model_default first-token sampling: {len(by_text)} possible texts, total variation {distance:.4f} "
          f"over {count} draws")
    assert distance < 0.06


# ------------------------------------------------------------------------------- the stage: kill and resume

from tests.conftest_ray import ray_local  # noqa: E402, F401 - a fixture


def sampled_stage_spec(folder, run: str, *overrides):
    queries = folder / "queries.jsonl"
    if not queries.is_file():
        words = ["what is the capital of france", "who wrote hamlet", "hi", "why is the sky blue", "name a prime",
                 "where do penguins live", "how many legs does a spider have", "what is two plus two"]
        queries.write_text("".join(f'{{"question": "{q}"}}\n' for q in words))
    return load_spec("specs/tiny.yaml", [
        f"output_dir={folder / run}", f"data.sources=[{{path: {queries}, text_field: question}}]", "data.limit=null",
        "generation.max_new_tokens=6", "generation.shard_size=2", "generation.do_sample=true",
        "generation.temperature=1.5", "generation.top_k=40", *overrides])


@pytest.mark.usefixtures("ray_local")
def test_a_sampled_run_killed_and_resumed_writes_the_answers_of_an_uninterrupted_one(tmp_path, monkeypatch):
    from components.stages import FAIL_AT_SHARD_ENV, ShardedOutput
    from workflows.generate import plan_generate, run_generate

    whole = ShardedOutput.load(run_generate(sampled_stage_spec(tmp_path, "whole", "generation.batch_size=4")))
    spec = sampled_stage_spec(tmp_path, "killed", "generation.batch_size=2")  # another batch size, the same answers
    monkeypatch.setenv(FAIL_AT_SHARD_ENV, "2")
    with pytest.raises(Exception, match="FAIL_AT_SHARD"):
        run_generate(spec)
    assert not plan_generate(spec)[0].complete
    monkeypatch.delenv(FAIL_AT_SHARD_ENV)
    resumed = ShardedOutput.load(run_generate(spec))
    assert resumed.read().to_pylist() == whole.read().to_pylist()
    # The sampling keys are part of the cache key; the seed too.
    base = plan_generate(spec, create=False)[0].folder
    for override in ("generation.top_k=5", "generation.min_p=0.1", "generation.repetition_penalty=1.2", "data.seed=3"):
        assert plan_generate(sampled_stage_spec(tmp_path, "killed", override), create=False)[0].folder != base, override
