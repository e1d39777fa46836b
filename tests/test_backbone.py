"""Backbone sources other than the real GGUF (which tests/test_smollm2.py covers, marked slow)."""

from __future__ import annotations

import pytest
import torch

from components.backbone import (
    BackboneError,
    build_random_backbone,
    folder_fingerprint,
    load_backbone,
    locate_package_file,
)
from components.spec import BackboneSpec, RandomBackboneSpec


def test_random_backbone_is_reproducible_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = load_backbone(BackboneSpec(source="random", random=RandomBackboneSpec(seed=3)))
    assert torch.equal(torch.rand(1), expected_next)
    again = load_backbone(BackboneSpec(source="random", random=RandomBackboneSpec(seed=3)))
    other = load_backbone(BackboneSpec(source="random", random=RandomBackboneSpec(seed=4)))
    assert first.fingerprint == again.fingerprint != other.fingerprint
    assert not any(p.requires_grad for p in first.model.parameters()) and not first.model.training


def test_byte_tokenizer_round_trips_any_text_and_has_a_chat_template():
    _, tokenizer = build_random_backbone(RandomBackboneSpec())
    text = "héllo wörld ✓ 123"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\n")


def test_folder_backbone_loads_and_is_fingerprinted_by_its_files(tmp_path):
    model, tokenizer = build_random_backbone(RandomBackboneSpec(seed=5))
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    loaded = load_backbone(BackboneSpec(source="folder", name=str(tmp_path / "m")))
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor)
    before = folder_fingerprint(tmp_path / "m")
    assert loaded.fingerprint == before
    config = tmp_path / "m" / "config.json"
    config.write_text(config.read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05'))
    assert folder_fingerprint(tmp_path / "m") != before


@pytest.mark.parametrize(
    "spec, message",
    [
        (BackboneSpec(source="package", name="no_such_package_xyz", file="*.gguf"), "'no_such_package_xyz' is not installed"),
        (BackboneSpec(source="package", name="components", file="*.gguf"), "must match exactly one file"),
        (BackboneSpec(source="gguf", name="/nonexistent/model.gguf"), "GGUF file not found"),
        (BackboneSpec(source="folder", name="/nonexistent/folder"), "not a Hugging Face model folder"),
    ],
)
def test_missing_backbones_give_errors_naming_the_key(spec, message):
    with pytest.raises(BackboneError, match=message):
        load_backbone(spec)


def test_locate_package_file_finds_a_file_without_importing_the_package():
    path = locate_package_file("components", "spec.py")
    assert path.name == "spec.py" and path.is_file()
