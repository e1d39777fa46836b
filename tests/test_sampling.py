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
