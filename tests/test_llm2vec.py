"""The llm2vec teacher: bidirectional attention, adapters in the published layout, mean pooling, and its errors.

Tiny random Llama and Qwen3 models are built in code and saved with peft adapters laid out like the published
McGill-NLP/LLM2Vec-*-mntp and *-mntp-unsup-simcse folders; every test runs with the network cut off.
"""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from components.backbone import build_byte_tokenizer, build_random_backbone
from components.llm2vec import (
    LLM2VecError,
    embed_texts,
    encoder_states,
    load_llm2vec,
    make_bidirectional,
    mntp_inputs,
    mntp_loss,
    simcse_loss,
    tokenize,
)
from components.spec import RandomBackboneSpec, SpecError, TeacherSpec, load_spec
from components.teacher import load_teacher, teacher_dimension, teacher_fingerprint

TEXTS = ["a short answer", "a much longer answer that goes on for quite a few more words than the first", "mid one"]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to reach the hub (or anything else) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _random_adapter(model, folder, seed: int, targets=("q_proj", "v_proj", "up_proj")):
    """A LoRA adapter with random A and B (B = 0 would make it a no-op), saved by peft into `folder`."""
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.normal_(0, 0.2)
    peft_model.save_pretrained(folder)
    return peft_model.unload()  # the base model again, without the adapter


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def published(request, tmp_path_factory):
    """base/ (a causal LM checkpoint), mntp/ (adapter + config + tokenizer, base named in adapter_config.json),
    simcse/ (a second adapter), as on the hub."""
    root = tmp_path_factory.mktemp(f"llm2vec-{request.param}")
    model, tokenizer = build_random_backbone(RandomBackboneSpec(architecture=request.param, initializer_range=0.2))
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    base = AutoModel.from_pretrained(root / "base")
    _random_adapter(base, root / "mntp", seed=1)
    base.config.save_pretrained(root / "mntp")
    tokenizer.save_pretrained(root / "mntp")
    merged = AutoModel.from_pretrained(root / "base")
    _merge_by_hand(merged, root / "mntp")
    _random_adapter(merged, root / "simcse", seed=2, targets=("k_proj", "o_proj", "down_proj"))
    return {"root": root, "architecture": request.param, "tokenizer": tokenizer}


def _merge_by_hand(model, adapter_folder) -> None:
    """W += (alpha / r) B A for every LoRA pair of the adapter: what merging means, written out."""
    config = json.loads((adapter_folder / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    weights = load_file(adapter_folder / "adapter_model.safetensors")
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key, a in weights.items():
            if ".lora_A." not in key:
                continue
            path = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            b = weights[key.replace(".lora_A.", ".lora_B.")]
            modules[path].weight += scale * (b @ a)


def _hand_built_encoder(root):
    model = AutoModel.from_pretrained(root / "base")
    _merge_by_hand(model, root / "mntp")
    _merge_by_hand(model, root / "simcse")
    return make_bidirectional(model).eval()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_attention_is_bidirectional_a_token_sees_the_tokens_after_it(published, attention):
    root, tokenizer = published["root"], published["tokenizer"]
    encoder, _ = load_llm2vec(str(root / "mntp"), [str(root / "simcse")], attn_implementation=attention)
    causal = AutoModel.from_pretrained(root / "base", attn_implementation=attention).eval()
    first, second = tokenize(tokenizer, ["the cat sat"], 16), tokenize(tokenizer, ["the cat sax"], 16)
    with torch.inference_mode():
        bidirectional = [encoder_states(encoder, b.input_ids, b.attention_mask)[0, 0] for b in (first, second)]
        plain = [causal(input_ids=b.input_ids).last_hidden_state[0, 0] for b in (first, second)]
    assert not torch.allclose(bidirectional[0], bidirectional[1], atol=1e-4)  # token 0 sees the last token
    torch.testing.assert_close(plain[0], plain[1])  # the same check on the causal model: it cannot see it


def test_adapters_change_the_output_exactly_as_merged_weights_would(published):
    root, tokenizer = published["root"], published["tokenizer"]
    teacher = load_teacher(TeacherSpec(kind="llm2vec", name=str(root / "mntp"), adapters=[str(root / "simcse")]),
                           backbone=None)
    got = teacher.embed(TEXTS)
    expected = embed_texts(_hand_built_encoder(root), tokenizer, TEXTS, batch_size=8, max_tokens=512)
    np.testing.assert_allclose(got, expected, atol=1e-5)

    only_mntp = load_teacher(TeacherSpec(kind="llm2vec", name=str(root / "mntp")), backbone=None).embed(TEXTS)
    no_adapter = load_teacher(TeacherSpec(kind="llm2vec", name=str(root / "base")), backbone=None).embed(TEXTS)
    assert np.abs(got - only_mntp).max() > 1e-2 and np.abs(only_mntp - no_adapter).max() > 1e-2  # each one counts


def test_a_vector_is_the_unnormalised_mean_over_the_text_tokens_whatever_the_padding_and_batch(published):
    root, tokenizer = published["root"], published["tokenizer"]
    spec = TeacherSpec(kind="llm2vec", name=str(root / "mntp"), adapters=[str(root / "simcse")], batch_size=2)
    assert spec.normalize is False and spec.pooling == "mean"
    teacher = load_teacher(spec, backbone=None)
    together = teacher.embed(TEXTS)  # batches of 2, padded to the longer text
    alone = np.stack([teacher.embed([text])[0] for text in TEXTS])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    reversed_order = teacher.embed(TEXTS[::-1])[::-1]
    np.testing.assert_allclose(together, reversed_order, atol=1e-5)

    batch = tokenize(tokenizer, [TEXTS[0]], 512)
    with torch.inference_mode():
        states = encoder_states(teacher.encoder, batch.input_ids, batch.attention_mask)[0]
    np.testing.assert_allclose(together[0], states.mean(0).numpy(), atol=1e-5)
    assert abs(np.linalg.norm(together[0]) - 1) > 1e-3  # not normalised
    assert teacher_dimension(spec) == 64 == teacher.dimension


def test_the_fingerprint_follows_the_adapter_weights(published, tmp_path):
    root = published["root"]
    spec = TeacherSpec(kind="llm2vec", name=str(root / "mntp"), adapters=[str(root / "simcse")])
    assert teacher_fingerprint(spec, None) == teacher_fingerprint(spec, None)
    other = TeacherSpec(kind="llm2vec", name=str(root / "mntp"))
    assert teacher_fingerprint(spec, None) != teacher_fingerprint(other, None)


def test_an_adapter_that_does_not_fit_the_base_model_is_named(published, tmp_path):
    root = published["root"]
    bigger, _ = build_random_backbone(RandomBackboneSpec(architecture=published["architecture"], hidden_size=96,
                                                         num_heads=4, num_kv_heads=2))
    _random_adapter(bigger.model, tmp_path / "wrong-size", seed=3)
    with pytest.raises(LLM2VecError, match=r"adapter .*wrong-size does not fit the base model.*size 64.*expects 96"):
        load_llm2vec(str(root / "mntp"), [str(tmp_path / "wrong-size")])

    # An adapter saved from the causal LM wrapper names modules (model.layers...) that the base model lacks.
    causal = AutoModelForCausalLM.from_pretrained(root / "base")
    _random_adapter(causal, tmp_path / "wrong-names", seed=4)
    with pytest.raises(LLM2VecError, match=r"does not fit the base model.*'model\.layers\.0\..*', which is not a linear"):
        load_llm2vec(str(root / "mntp"), [str(tmp_path / "wrong-names")])


def test_an_architecture_without_a_known_bidirectional_attention_is_refused(tmp_path):
    tokenizer = build_byte_tokenizer()
    config = AutoConfig.for_model("gpt2", n_layer=1, n_embd=16, n_head=2, vocab_size=len(tokenizer))
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(LLM2VecError, match="architecture 'gpt2' has no known way to make its attention bidirectional"):
        load_llm2vec(str(tmp_path / "gpt2"))


def test_a_missing_base_model_is_an_error_naming_it(tmp_path, published):
    adapter = tmp_path / "orphan"
    adapter.mkdir()
    config = json.loads((published["root"] / "mntp" / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": str(tmp_path / "gone")}))
    with pytest.raises(LLM2VecError, match="cannot load the base model"):
        load_llm2vec(str(adapter))


def test_spec_rules_for_llm2vec_teachers():
    assert TeacherSpec(kind="llm2vec", name="x", normalize=True).normalize is True
    with pytest.raises(ValueError, match="only kind llm2vec takes adapters"):
        TeacherSpec(kind="hf_mean_pool", name="x", adapters=["y"])
    with pytest.raises(ValueError, match="either name .* or train"):
        TeacherSpec(kind="llm2vec", name="x", train={})
    with pytest.raises(ValueError, match="only kind llm2vec can be trained"):
        TeacherSpec(kind="backbone_mean_pool", train={})
    with pytest.raises(SpecError, match="teacher.train: no text to train on"):
        load_spec("specs/tiny.yaml", ["teacher.kind=llm2vec", "teacher.train.texts=[]"])


def test_mntp_masks_only_text_tokens_and_predicts_token_i_from_position_i_minus_1(published):
    tokenizer = published["tokenizer"]
    batch = tokenize(tokenizer, ["abcdefghij", "ab"], 32)
    inputs, labels = mntp_inputs(batch, mask_id=62, vocab_size=len(tokenizer), probability=0.5,
                                 generator=torch.Generator().manual_seed(0))
    chosen = labels != -100
    assert chosen.any() and not chosen[batch.pool_mask == 0].any()  # never a padding position
    assert torch.equal(labels[chosen], batch.input_ids[chosen])
    assert torch.equal(inputs[~chosen], batch.input_ids[~chosen])
    # A head that maps position i-1's state to the token at i gives a loss near 0 exactly when shifted that way.
    hidden = torch.nn.functional.one_hot(batch.input_ids.roll(-1, dims=1), len(tokenizer)).float() * 50
    loss = mntp_loss(hidden, torch.nn.Identity(), labels)
    unshifted = mntp_loss(torch.nn.functional.one_hot(batch.input_ids, len(tokenizer)).float() * 50,
                          torch.nn.Identity(), labels)
    assert loss.item() < 1e-3 < unshifted.item()


def test_simcse_loss_is_low_for_matching_views_and_high_for_shuffled_ones():
    views = torch.randn(8, 16)
    noisy = views + 0.01 * torch.randn(8, 16)
    assert simcse_loss(views, noisy, 0.05).item() < 0.01
    assert simcse_loss(views, noisy.roll(1, dims=0), 0.05).item() > 5
