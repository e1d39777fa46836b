"""MKL packed GEMM for decoding on a CPU: the packed path is the one taken, it gives the plain layer's numbers, and
it steps aside where it cannot apply (gradients, other dtypes, no MKL)."""

from __future__ import annotations

import platform

import pytest
import torch
from torch import nn

from components import packed_linear
from components.backbone import load_backbone
from components.generation import decode_batch, render_prompt, tokenize_prompts
from components.packed_linear import pack_linears
from components.spec import GenerationSpec, load_spec

# torch's x86 wheels are built with MKL; elsewhere (ARM) pack_linears returns None, which the last test covers.
needs_mkl = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="MKL is x86 only")


def frozen_linear(rows_in: int = 24, rows_out: int = 40, bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(rows_in, rows_out, bias=bias)
    layer.requires_grad_(False)
    return layer


@needs_mkl
@pytest.mark.parametrize("rows", [1, 3, 16, 40])
def test_a_packed_layer_gives_the_plain_layers_numbers_for_any_row_count(rows):
    layer = frozen_linear()
    packed = pack_linears(layer, rows=16)
    hidden = torch.randn(rows, 1, 24)  # (B, 1, in): the shape of a decoding step
    plain = layer(hidden)
    with packed:
        assert "forward" in layer.__dict__
        fast = layer(hidden)
    assert fast.shape == plain.shape
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    assert "forward" not in layer.__dict__  # leaving the block restores the class's forward


@needs_mkl
def test_at_the_packed_row_count_the_layer_multiplies_through_the_packed_copy():
    layer = frozen_linear(bias=False)
    packed = pack_linears(layer, rows=8)
    before = layer.weight.clone()
    layer.weight.mul_(2)  # the packed copy still holds the old weights: only the packed path gives the old product
    hidden = torch.randn(8, 24)
    with packed:
        torch.testing.assert_close(layer(hidden), hidden @ before.T)
        # At another row count MKL multiplies by the layer's own weight (decode_batch keeps its width for this).
        torch.testing.assert_close(layer(hidden[:3]), hidden[:3] @ layer.weight.T)
    torch.testing.assert_close(layer(hidden), hidden @ layer.weight.T)


@needs_mkl
def test_layers_that_train_or_are_not_fp32_are_left_alone():
    model = nn.Sequential(frozen_linear(), nn.Linear(40, 8), frozen_linear(40, 8).to(torch.bfloat16))
    packed = pack_linears(model, rows=4)
    assert packed.modules == [model[0]]
    assert packed.nbytes == 40 * 24 * 4


@needs_mkl
def test_a_packed_layer_still_passes_gradients_to_its_input():
    layer = frozen_linear()
    hidden = torch.randn(4, 24, requires_grad=True)
    with pack_linears(layer, rows=4):
        layer(hidden).sum().backward()
    torch.testing.assert_close(hidden.grad, layer.weight.sum(0).expand(4, 24))


@needs_mkl
def test_greedy_answers_are_the_same_with_packed_weights():
    backbone = load_backbone(load_spec("specs/tiny.yaml").backbone)
    settings = GenerationSpec(max_new_tokens=12, batch_size=4)
    queries = ["what is the capital of france", "who wrote hamlet", "hi", "why is the sky blue"]
    prompts = tokenize_prompts(backbone.tokenizer, [render_prompt(backbone.tokenizer, q, settings) for q in queries])
    plain = decode_batch(backbone.model, backbone.tokenizer, prompts, settings)
    packed = pack_linears(backbone.model, rows=4)
    assert packed is not None and len(packed.modules) > 0
    with packed:
        fast = decode_batch(backbone.model, backbone.tokenizer, prompts, settings)
    assert [r.response for r in fast] == [r.response for r in plain]


def test_without_mkl_nothing_is_packed(monkeypatch):
    monkeypatch.setattr(packed_linear, "mkl_packing_available", lambda: False)
    assert pack_linears(frozen_linear(), rows=4) is None
