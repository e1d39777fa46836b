"""`teacher.kind: llm2vec` against the official llm2vec package (0.2.3, transformers 4.44): the same tiny random Llama
and Qwen2 with MNTP + SimCSE adapters in the published layout, the same 64 texts. The fixtures and the official
outputs were made by benchmarks/official_llm2vec.py in the package's own venv; this test needs no second venv.

Qwen2: the package's Qwen2BiModel stays causal on eager and sdpa attention (it sets `is_causal = False` but keeps
Qwen2Model._update_causal_mask, which builds a causal mask; only the GPU flash_attention_2 kernel reads the flag).
So its bidirectional reference (bidirectional_*.npy) is the package's own model given a 4-D padding-only mask, which
that mask builder passes through unchanged, and its as-is output (attended_*.npy, encode_*.npy) is checked against
ours with a causal mask: everything but the mask."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from components import llm2vec
from components.llm2vec import bidirectional_mask
from components.spec import TeacherSpec
from components.teacher import LLM2VecTeacher

FIXTURES = Path(__file__).parent / "fixtures" / "llm2vec_official"
ARCHITECTURES = ["llama", "qwen2"]
# The official trainer's target with bidirectional attention: LLM2Vec's model as loaded for Llama; for Qwen2 the
# same model given a padding-only 4-D mask (see the module docstring).
BIDIRECTIONAL = {"llama": "attended", "qwen2": "bidirectional"}
pytestmark = pytest.mark.skipif(not (FIXTURES / "texts.json").is_file(), reason="fixtures not generated")


def official(architecture: str, dtype: str = "float32") -> np.ndarray:
    return np.load(FIXTURES / architecture / f"{BIDIRECTIONAL[architecture]}_{dtype}.npy")


def embed(architecture: str, **settings) -> np.ndarray:
    root = FIXTURES / architecture
    spec = TeacherSpec(kind="llm2vec", name=str(root / "mntp"), adapters=[str(root / "simcse")], batch_size=16,
                       **settings)
    return LLM2VecTeacher(spec, "cpu").embed(json.loads((FIXTURES / "texts.json").read_text()))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_the_default_teacher_equals_the_official_trainers_target_in_float32(architecture):
    reference = official(architecture)
    ours = embed(architecture)  # the defaults: every attended token, the SimCSE adapter unmerged
    assert ours.shape == reference.shape == (64, 64)
    assert np.abs(ours - reference).max() <= 1e-5


def test_mean_text_pooling_equals_the_official_llm2vec_encode():
    official_encode = np.load(FIXTURES / "llama" / "encode_float32.npy")
    assert np.abs(embed("llama", pooling="mean_text") - official_encode).max() <= 1e-5


def causal_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What the official Qwen2BiModel attends with on eager/sdpa: our padding mask plus the causal triangle."""
    mask = bidirectional_mask(attention_mask, dtype)
    length = attention_mask.shape[1]
    return mask.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), torch.finfo(dtype).min)


def test_the_official_qwen2_path_is_causal_and_otherwise_equals_ours(monkeypatch):
    as_is = np.load(FIXTURES / "qwen2" / "attended_float32.npy")
    # The package's Qwen2 output is far from its own bidirectional states, and its encode() (no BOS: the same pool)
    # equals it: the mask, not the pooling, is what differs.
    assert np.abs(as_is - official("qwen2")).max() > 0.1
    assert np.abs(as_is - np.load(FIXTURES / "qwen2" / "encode_float32.npy")).max() <= 1e-5
    # Ours given the causal mask: tokenizer, adapters, biases, padding and pooling all agree with the package's.
    monkeypatch.setattr(llm2vec, "bidirectional_mask", causal_mask)
    assert np.abs(embed("qwen2") - as_is).max() <= 1e-5


def test_the_poolings_differ_where_the_tokenizer_adds_bos():
    # Llama's tokenizer adds BOS, which the official trainer averages in and LLM2Vec.encode leaves out; Qwen2's adds none.
    llama = FIXTURES / "llama"
    assert np.abs(np.load(llama / "attended_float32.npy") - np.load(llama / "encode_float32.npy")).max() > 1e-2
    assert np.abs(embed("llama") - embed("llama", pooling="mean_text")).max() > 1e-2
    assert np.abs(embed("qwen2") - embed("qwen2", pooling="mean_text")).max() <= 1e-6


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_merging_the_last_adapter_in_float32_changes_little(architecture):
    assert np.abs(embed(architecture, merge_adapters=True) - official(architecture)).max() <= 1e-4


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_bfloat16_stays_near_the_official_bfloat16(architecture):
    official_bf16, reference = official(architecture, "bfloat16"), official(architecture)
    ours = embed(architecture, dtype="bfloat16")
    scale = np.abs(reference).max()
    # Both round differently from float32; ours must be no further from the float32 truth than a few bf16 steps.
    assert np.abs(ours - reference).max() <= 0.05 * scale
    assert np.abs(ours - official_bf16).max() <= 0.05 * scale
