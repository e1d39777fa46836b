"""Decoding through weights kept in their GGUF blocks: found only where exact, rebuilt bit for bit, multiplied to
float rounding of the plain layer, and stepping aside where they do not apply."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from components import block_linear, packed_linear
from components.backbone import load_backbone
from components.block_linear import BlockWeight, block_weight, q4_1_factors, q8_0_factors
from components.generation import decode_batch, render_prompt, tokenize_prompts
from components.packed_linear import pack_linears
from components.spec import GenerationSpec, load_spec

# The kernel is AVX-512; on another CPU kernel() is None and pack_linears keeps MKL (tested below by forcing it).
needs_kernel = pytest.mark.skipif(
    block_linear.kernel() is None, reason="the block kernel needs a C++ compiler and an AVX-512 CPU"
)


def quantized_q4_1(weight: torch.Tensor) -> torch.Tensor:
    """What loading a GGUF Q4_1 tensor gives: llama.cpp's quantizer, then float32 d*q + m per block of 32."""
    n, k = weight.shape
    blocks = weight.reshape(n, k // 32, 32)
    low, high = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
    step, offset = ((high - low) / 15).half().float(), low.half().float()
    q = ((blocks - offset) / step).round().clamp(0, 15)
    return (step * q + offset).reshape(n, k)


def quantized_q8_0(weight: torch.Tensor) -> torch.Tensor:
    n, k = weight.shape
    blocks = weight.reshape(n, k // 32, 32)
    step = (blocks.abs().amax(-1, keepdim=True) / 127).half().float()
    return (step * (blocks / step).round()).reshape(n, k)


def one_ulp_off(weight: torch.Tensor, index: tuple[int, int]) -> torch.Tensor:
    changed = weight.clone()
    changed[index] = torch.nextafter(changed[index], torch.tensor(float("inf")))
    return changed


def test_q4_1_factors_rebuild_every_weight_bit_for_bit():
    weight = quantized_q4_1(torch.randn(48, 96, generator=torch.Generator().manual_seed(0)))
    q, d, m = q4_1_factors(weight)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and d.dtype == m.dtype == torch.float16
    assert d.shape == m.shape == (48, 3)
    rebuilt = d.float().repeat_interleave(32, 1) * q.float() + m.float().repeat_interleave(32, 1)
    assert torch.equal(rebuilt.view(torch.int32), weight.view(torch.int32))


def test_q8_0_factors_rebuild_every_weight_bit_for_bit():
    weight = quantized_q8_0(torch.randn(32, 64, generator=torch.Generator().manual_seed(1)))
    q, d = q8_0_factors(weight)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    assert torch.equal(d.float().repeat_interleave(32, 1) * q.float(), weight)


def test_weights_that_are_not_exactly_quantized_stay_float32():
    q4 = quantized_q4_1(torch.randn(32, 64, generator=torch.Generator().manual_seed(2)))
    q8 = quantized_q8_0(torch.randn(32, 64, generator=torch.Generator().manual_seed(3)))
    assert q4_1_factors(one_ulp_off(q4, (5, 40))) is None
    assert q8_0_factors(one_ulp_off(q8, (7, 3))) is None
    assert block_weight(one_ulp_off(q8, (7, 3))) is None
    assert block_weight(torch.randn(32, 64)) is None  # a plain float32 matrix
    assert block_weight(quantized_q4_1(torch.randn(40, 64))[:24, :48].contiguous()) is None  # K not whole blocks
    assert block_weight(q4.to(torch.bfloat16)) is None
    assert block_weight(q4).format == "q4_1" and block_weight(q8).format == "q8_0"


def test_factors_found_slice_by_slice_are_those_of_the_whole_matrix():
    weight = quantized_q4_1(torch.randn(80, 64, generator=torch.Generator().manual_seed(6)))
    whole = q4_1_factors(weight)
    sliced = block_linear._by_rows(weight, block_linear._q4_1_rows, rows=16)
    assert all(torch.equal(a, b) for a, b in zip(whole, sliced, strict=True))
    assert block_linear._by_rows(one_ulp_off(weight, (70, 9)), block_linear._q4_1_rows, rows=16) is None  # last slice
    weight[33, 0] = float("inf")
    assert q4_1_factors(weight) is None


@needs_kernel
@pytest.mark.parametrize("quantize", [quantized_q4_1, quantized_q8_0])
def test_the_kernel_rebuilds_the_exact_weights(quantize):
    weight = quantize(torch.randn(64, 96, generator=torch.Generator().manual_seed(4)))
    blocks = block_weight(weight)
    for start in (0, 80):  # one-hot rows: each output is one weight times 1, so it must be that weight exactly
        unit_rows = torch.eye(96)[start : start + 16]
        assert torch.equal(block_linear.block_linear(unit_rows, blocks), weight[:, start : start + 16].T)


@needs_kernel
@pytest.mark.parametrize("quantize", [quantized_q4_1, quantized_q8_0])
@pytest.mark.parametrize("rows", [1, 3, 8, 16])
def test_the_kernel_gives_the_plain_layers_product(quantize, rows):
    weight = quantize(torch.randn(160, 128, generator=torch.Generator().manual_seed(5)) * 0.1)
    bias = torch.randn(160)
    hidden = torch.randn(rows, 1, 128)  # (B, 1, in): a decoding step
    fast = block_linear.block_linear(hidden, block_weight(weight), bias)
    assert fast.shape == (rows, 1, 160)
    torch.testing.assert_close(fast, nn.functional.linear(hidden, weight, bias), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_the_kernel_refuses_what_it_cannot_multiply():
    blocks = block_weight(quantized_q4_1(torch.randn(32, 64)))
    with pytest.raises(ValueError, match="1..16 float32 CPU rows of 64"):
        block_linear.block_linear(torch.randn(17, 64), blocks)
    with pytest.raises(ValueError, match="float64"):
        block_linear.block_linear(torch.randn(2, 64, dtype=torch.float64), blocks)


def quantized_linear(rows_in: int = 64, rows_out: int = 48, bias: bool = False) -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(rows_in, rows_out, bias=bias)
    layer.weight.data = quantized_q4_1(layer.weight.data)
    layer.requires_grad_(False)
    return layer


@needs_kernel
def test_decoding_rows_go_through_the_blocks_and_a_prefill_through_the_float32_weight():
    layer = quantized_linear()
    packed = pack_linears(layer, rows=16)
    assert packed.formats == ["q4_1"] and packed.nbytes == block_weight(layer.weight).nbytes
    before = layer.weight.clone()
    layer.weight.mul_(2)  # the block copy still holds the old weights: only the block path gives the old product
    with packed:
        torch.testing.assert_close(layer(torch.ones(16, 64)), torch.ones(16, 64) @ before.T)
        many = torch.ones(17, 64)  # more rows than the kernel keeps in registers
        torch.testing.assert_close(layer(many), many @ layer.weight.T)
    assert "forward" not in layer.__dict__


@needs_kernel
def test_a_block_layer_still_passes_gradients_to_its_input():
    layer = quantized_linear()
    hidden = torch.randn(4, 64, requires_grad=True)
    with pack_linears(layer, rows=4):
        layer(hidden).sum().backward()
    torch.testing.assert_close(hidden.grad, layer.weight.sum(0).expand(4, 64))


@needs_kernel
def test_greedy_answers_are_the_same_with_block_weights(monkeypatch):
    backbone = load_backbone(load_spec("specs/tiny.yaml").backbone)
    with torch.no_grad():  # the decoder layers' projections as a Q4_1 GGUF holds them
        for module in backbone.model.model.layers.modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(quantized_q4_1(module.weight))
    settings = GenerationSpec(max_new_tokens=12, batch_size=4)
    queries = ["what is the capital of france", "who wrote hamlet", "hi", "why is the sky blue"]
    prompts = tokenize_prompts(backbone.tokenizer, [render_prompt(backbone.tokenizer, q, settings) for q in queries])
    plain = decode_batch(backbone.model, backbone.tokenizer, prompts, settings)
    calls = []
    make_multiplier = block_linear.multiplier

    def counted(*args):
        multiply = make_multiplier(*args)
        return lambda hidden: calls.append(1) or multiply(hidden)

    monkeypatch.setattr(block_linear, "multiplier", counted)
    packed = pack_linears(backbone.model, rows=4)
    assert packed.formats.count("q4_1") == 2 * 7  # every projection of both layers
    with packed:
        fast = decode_batch(backbone.model, backbone.tokenizer, prompts, settings)
    assert len(calls) >= 11 * 14  # every decoding step's projections went through the kernel
    assert [r.response for r in fast] == [r.response for r in plain]
    assert len({r.response for r in plain}) == 4 and all(r.response_tokens == 12 for r in plain)


def test_without_a_compiler_decoding_keeps_mkl(monkeypatch, tmp_path):
    monkeypatch.setenv("LLM2VEC_GEN_CACHE", str(tmp_path))  # no kernel built earlier to fall back on
    monkeypatch.setenv("CXX", "no-such-compiler")
    block_linear.kernel.cache_clear()
    try:
        assert block_linear.kernel() is None
        packed = pack_linears(quantized_linear(), rows=4)
        assert packed.formats == ["mkl"] if packed_linear.mkl_packing_available() else packed is None
    finally:
        block_linear.kernel.cache_clear()


def test_a_kernel_that_fails_to_compile_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("LLM2VEC_GEN_CACHE", str(tmp_path))
    source = tmp_path / "broken.cpp"
    source.write_text("this is not C++\n")
    monkeypatch.setattr(block_linear, "SOURCE", source)
    with pytest.raises(RuntimeError, match="broken.cpp"):
        block_linear._build()
    assert not list((tmp_path / "kernels").glob("*.so"))  # nothing half-built left where the next run would load it


def test_a_block_weight_reports_its_bytes():
    blocks = block_weight(quantized_q4_1(torch.randn(32, 64)))
    assert isinstance(blocks, BlockWeight)
    assert blocks.nbytes == 32 * 64 // 2 + 2 * 2 * 32 * 2  # 4-bit codes + fp16 d and m per block of 32
