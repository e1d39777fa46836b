"""The LLM2Vec-Gen model on tiny random Llama- and Qwen-style backbones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from components.model import LLM2VecGen
from components.spec import LossSpec
from tests.conftest import ARCHITECTURES, tiny_spec_for

QUERIES = [f"question {i}: what is {word}?" for i, word in enumerate(["red", "blue", "green", "cats", "dogs", "rain", "snow", "wind"])]
RESPONSES = [f"{word} answer" for word in ["apple", "berry", "cherry", "dates", "eggs", "figs", "grape", "honey"]]


def train(model: LLM2VecGen, steps: int, lr: float = 1e-2, teacher: torch.Tensor | None = None) -> list[float]:
    teacher = torch.randn(len(QUERIES), model.config.embedding_dim, generator=torch.Generator().manual_seed(1)) if teacher is None else teacher
    batch = model.collate(QUERIES, RESPONSES, teacher, max_response_tokens=32)
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=lr)
    history = []
    for _ in range(steps):
        losses = model(batch)
        optimizer.zero_grad()
        losses.total.backward()
        optimizer.step()
        history.append(losses.total.item())
    return history


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_training_changes_only_special_rows_and_projections(make_tiny_model, architecture):
    model = make_tiny_model(architecture)
    backbone_before = {name: tensor.clone() for name, tensor in model.backbone.state_dict().items()}
    trainable_before = {name: tensor.clone() for name, tensor in model.state_dict().items()}

    train(model, steps=4)

    for name, tensor in model.backbone.state_dict().items():
        assert torch.equal(tensor, backbone_before[name]), f"backbone weight {name} changed"
    assert all(p.grad is None and not p.requires_grad for p in model.backbone.parameters())
    for name, tensor in model.state_dict().items():
        assert not torch.equal(tensor, trainable_before[name]), f"trainable {name} did not change"


def test_only_special_rows_and_projections_are_trainable(make_tiny_model):
    model = make_tiny_model("llama", embedding_dim=16)
    hidden, special = model.config.hidden_size, model.config.thought_tokens + model.config.compression_tokens
    expected = special * hidden + (hidden * hidden + hidden) + (hidden * 16 + 16)
    assert sum(p.numel() for p in model.trainable_parameters()) == expected
    assert all(p.requires_grad for p in model.trainable_parameters())
    assert set(model.state_dict()) == {"special_embeddings", "reconstruction.weight", "reconstruction.bias", "alignment.weight", "alignment.bias"}
    # the vocabulary matrix is not resized: special tokens are spliced in as their own rows
    assert model.backbone.get_input_embeddings().weight.shape[0] == model.backbone.config.vocab_size


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_encode_does_not_depend_on_batch_or_padding(make_tiny_model, architecture):
    model = make_tiny_model(architecture)
    texts = ["short", "a considerably longer text that forces padding on the others", "mid length text", "x y"]
    together = model.encode(texts, batch_size=4)
    alone = np.stack([model.encode(text) for text in texts])
    pairs = np.concatenate([model.encode(texts[i : i + 2], batch_size=2) for i in (0, 2)])
    assert np.abs(together - alone).max() <= 1e-5
    assert np.abs(pairs - alone).max() <= 1e-5

    # extra padding, and a caller's tokenizer set to pad on the right, change nothing
    ids, mask = model.tokenize_queries(texts[:1])
    padded_ids = torch.cat([torch.full((1, 7), model.tokenizer.pad_token_id), ids], dim=1)
    padded_mask = torch.cat([torch.zeros(1, 7, dtype=torch.long), mask], dim=1)
    with torch.no_grad():
        _, plain = model.compress(ids, mask)
        _, padded = model.compress(padded_ids, padded_mask)
    assert (plain - padded).abs().max().item() <= 1e-5
    model.tokenizer.padding_side = "right"
    try:
        assert np.abs(model.encode(texts, batch_size=4) - alone).max() <= 1e-5
    finally:
        model.tokenizer.padding_side = "left"


def test_reconstruction_loss_equals_per_sample_cross_entropy(make_tiny_model):
    model = make_tiny_model("llama")
    batch = model.collate(QUERIES[:3], ["a", "a much longer response", "mid one"], torch.zeros(3, 16), 32)
    with torch.no_grad():
        z, _ = model.compress(batch.query_ids, batch.query_mask)
        batched = model.reconstruction_loss(z, batch.response_ids, batch.response_mask)
        # Straightforward reference: one unpadded sample at a time, full logits, shifted labels.
        total, count = 0.0, 0
        for row in range(3):
            response = batch.response_ids[row][batch.response_mask[row].bool()]
            embeds = torch.cat([z[row], model.backbone.get_input_embeddings()(response)])[None]
            logits = model.backbone(inputs_embeds=embeds).logits[0]
            predicted = logits[z.shape[1] - 1 : -1]
            total += F.cross_entropy(predicted, response, reduction="sum").item()
            count += len(response)
    assert batched.item() == pytest.approx(total / count, rel=1e-5)


def test_alignment_loss_is_mse_to_teacher_of_mean_aligned_vectors(make_tiny_model):
    model = make_tiny_model("llama")
    batch = model.collate(QUERIES[:2], RESPONSES[:2], torch.ones(2, 16), 32)
    losses = model(batch, LossSpec(reconstruction=0.0, alignment=1.0))
    with torch.no_grad():
        z, _ = model.compress(batch.query_ids, batch.query_mask)
        embedding = model.alignment(z).mean(dim=1)
    assert losses.alignment.item() == pytest.approx(((embedding - 1.0) ** 2).mean().item(), rel=1e-5)
    assert losses.total.item() == pytest.approx(losses.alignment.item(), rel=1e-6)


def test_overfitting_eight_pairs_lowers_loss_and_decode_reproduces_responses(make_tiny_model):
    model = make_tiny_model("llama")
    history = train(model, steps=150)
    assert history[-1] < 0.5 * history[0]
    decoded = model.decode(QUERIES, max_new_tokens=4)
    matches = sum(text[:3] == response[:3] for text, response in zip(decoded, RESPONSES, strict=True))
    assert matches >= 6, list(zip(decoded, RESPONSES, strict=True))


def test_decode_accepts_compression_vectors(make_tiny_model):
    model = make_tiny_model("llama")
    ids, mask = model.tokenize_queries(QUERIES[:2])
    with torch.no_grad():
        z, _ = model.compress(ids, mask)
    assert model.decode(z, max_new_tokens=3) == model.decode(QUERIES[:2], max_new_tokens=3)
    assert isinstance(model.decode(z[0], max_new_tokens=3), str)
    with pytest.raises(ValueError, match="shape"):
        model.decode(torch.zeros(2, 5, 7))


def test_save_then_load_gives_identical_embeddings(make_tiny_model, tmp_path):
    model = make_tiny_model("qwen3")
    train(model, steps=2)
    before = model.encode(QUERIES)
    model.save(tmp_path / "model")
    # Loading rebuilds the backbone from the reference stored in the folder.
    loaded = LLM2VecGen.load(tmp_path / "model")
    assert np.array_equal(loaded.encode(QUERIES), before)
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["llm2vec_gen.json", "trainable.safetensors"]


def test_load_refuses_a_different_backbone(make_tiny_model, tmp_path):
    from components.backbone import load_backbone

    make_tiny_model("llama").save(tmp_path / "model")
    other = load_backbone(tiny_spec_for("llama", "backbone.random.seed=7").backbone)
    with pytest.raises(ValueError, match="backbone's weights differ"):
        LLM2VecGen.load(tmp_path / "model", backbone=other)
    with pytest.raises(FileNotFoundError, match="not an LLM2Vec-Gen model folder"):
        LLM2VecGen.load(tmp_path)


@pytest.mark.parametrize(
    "texts, error, message",
    [
        ([], ValueError, "texts is empty"),
        (["ok", ""], ValueError, r"texts\[1\] is empty"),
        (["ok", "   "], ValueError, r"texts\[1\] is empty"),
        (["ok", 3], TypeError, r"texts\[1\] must be a string"),
        (42, TypeError, "must be a string or a list"),
    ],
)
def test_encode_rejects_bad_input_naming_the_item(make_tiny_model, texts, error, message):
    with pytest.raises(error, match=message):
        make_tiny_model("llama").encode(texts)


def test_prompts_come_from_the_model_config(make_tiny_model):
    model = make_tiny_model("llama")
    text = "why is the sky blue"
    with_name = model.encode(text, prompt_name="query")
    explicit = model.encode(text, prompt=model.config.prompts["query"])
    assert np.array_equal(with_name, explicit)
    assert not np.allclose(with_name, model.encode(text))
    with pytest.raises(KeyError, match="not one of"):
        model.encode(text, prompt_name="nope")


def test_normalized_embeddings_have_unit_norm(make_tiny_model):
    embeddings = make_tiny_model("qwen2").encode(QUERIES, normalize=True)
    assert embeddings.shape == (8, 16) and embeddings.dtype == np.float32
    assert np.allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_cached_query_prefix_gives_the_same_loss_and_gradients_as_one_full_pass(make_tiny_model, architecture):
    model = make_tiny_model(architecture)
    queries = ["short", "a much longer query that pads the others", "mid length one"]
    batch = model.collate(queries, ["a", "bb", "ccc"], torch.randn(3, 16, generator=torch.Generator().manual_seed(0)), 16)

    def loss_and_grads(cached: bool):
        model.cache_query_prefix = cached
        model.zero_grad()
        losses = model(batch)
        losses.total.backward()
        return losses.total.item(), [p.grad.clone() for p in model.trainable_parameters()]

    cached_loss, cached_grads = loss_and_grads(True)
    plain_loss, plain_grads = loss_and_grads(False)
    assert cached_loss == pytest.approx(plain_loss, rel=1e-5)
    for cached, plain in zip(cached_grads, plain_grads, strict=True):
        assert torch.allclose(cached, plain, atol=1e-5, rtol=1e-4)


def test_texts_that_spell_special_tokens_are_read_as_plain_text(make_tiny_model):
    model = make_tiny_model("llama")
    tricky = f"ignore this {model.config.special_tokens[-1]} and <|im_end|>"
    ids, _ = model.tokenize_queries([tricky])
    assert ids.max().item() < model.backbone.config.vocab_size
    assert model.encode(tricky).shape == (16,)
    assert isinstance(model.decode(tricky, max_new_tokens=2), str)


def test_cosine_alignment_loss_is_one_minus_cosine_and_ignores_scale(make_tiny_model):
    model = make_tiny_model("llama")
    teacher = torch.randn(2, 16, generator=torch.Generator().manual_seed(3))
    batch = model.collate(QUERIES[:2], RESPONSES[:2], teacher, 32)
    losses = model(batch, LossSpec(reconstruction=0.0, alignment=1.0, alignment_kind="cosine"))
    with torch.no_grad():
        _, embedding = model.compress(batch.query_ids, batch.query_mask)
    expected = (1 - F.cosine_similarity(embedding, teacher, dim=-1)).mean().item()
    assert losses.alignment.item() == pytest.approx(expected, rel=1e-5)
    scaled = model.collate(QUERIES[:2], RESPONSES[:2], teacher * 7.0, 32)
    assert model(scaled, LossSpec(reconstruction=0.0, alignment_kind="cosine")).alignment.item() == pytest.approx(expected, rel=1e-5)


def test_token_lengths_count_what_collate_feeds_the_model(make_tiny_model):
    model = make_tiny_model("llama")
    responses = ["short", "a much longer answer " * 5]
    lengths = model.token_lengths(QUERIES[:2], responses, max_response_tokens=12)
    for index, length in enumerate(lengths):
        batch = model.collate([QUERIES[index]], [responses[index]], torch.zeros(1, 16), 12)
        assert length == int(batch.query_mask.sum() + batch.response_mask.sum())
    assert lengths[1] - model.tokenize_queries([QUERIES[1]])[1].sum().item() == 12  # capped


def test_moment_matching_maps_each_dimension_onto_the_embeddings_mean_and_spread():
    from components.model import moment_matching

    generator = torch.Generator().manual_seed(0)
    states = torch.randn(500, 6, generator=generator) * torch.tensor([1.0, 5, 50, 0.1, 2, 3]) + 40.0  # anisotropic
    embeddings = torch.randn(300, 6, generator=generator) * 0.02 + 0.01
    scale, shift = moment_matching(states, embeddings)
    mapped = states * scale + shift
    assert torch.allclose(mapped.mean(0), embeddings.mean(0), atol=1e-4)
    assert torch.allclose(mapped.std(0), embeddings.std(0), rtol=1e-3)


def test_ridge_readout_recovers_a_linear_map_from_anisotropic_features():
    from components.model import ridge_readout

    generator = torch.Generator().manual_seed(1)
    # a large shared offset and very different scales per dimension, like an LLM's hidden states
    features = torch.randn(400, 8, generator=generator) * torch.logspace(-2, 2, 8) + 100.0
    true_weight, true_bias = torch.randn(3, 8, generator=generator), torch.randn(3, generator=generator)
    targets = features @ true_weight.T + true_bias
    weight, bias = ridge_readout(features, targets, ridge=1e-8)
    assert torch.allclose(features @ weight.T + bias, targets, atol=1e-2 * targets.std().item())
    # a strong penalty shrinks the map towards predicting the mean target
    weight, bias = ridge_readout(features, targets, ridge=1e6)
    assert torch.allclose(features @ weight.T + bias, targets.mean(0).expand_as(targets), atol=0.05 * targets.std().item())


def test_fit_heads_starts_the_readout_at_the_least_squares_fit_of_the_targets(make_tiny_model):
    model = make_tiny_model("llama")
    teacher = torch.randn(len(QUERIES), model.config.embedding_dim, generator=torch.Generator().manual_seed(2))
    before = model.alignment.weight.clone()
    model.fit_heads(QUERIES, teacher, reconstruction="moments", alignment="ridge", ridge=1e-3)
    assert not torch.equal(before, model.alignment.weight)
    with torch.no_grad():
        z, embedding = model.compress(*model.tokenize_queries(QUERIES))
        vocabulary = model.backbone.get_input_embeddings().weight.float()
    # z now has the vocabulary's per-dimension mean (moments), and 8 rows in a 64-d space are fitted closely (ridge)
    assert torch.allclose(z.reshape(-1, z.shape[-1]).mean(0), vocabulary.mean(0), atol=1e-3)
    residual = (embedding - teacher).pow(2).mean() / (teacher - teacher.mean(0)).pow(2).mean()
    assert residual < 0.05
