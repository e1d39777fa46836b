"""The reserved KV cache holds exactly what transformers' DynamicCache holds, through every operation decoding uses."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from components.backbone import load_backbone
from components.generation import decoding_cache
from components.kv_cache import ReservedLayer, reserved_cache
from components.spec import load_spec


def states(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 2, length, 4, generator=generator), torch.randn(batch, 2, length, 4, generator=generator)


def assert_same(reserved: DynamicLayer, dynamic: DynamicLayer) -> None:
    assert reserved.get_seq_length() == dynamic.get_seq_length()
    torch.testing.assert_close(reserved.keys, dynamic.keys, rtol=0, atol=0)
    torch.testing.assert_close(reserved.values, dynamic.values, rtol=0, atol=0)


def test_a_reserved_layer_matches_a_dynamic_one_through_prefill_steps_repeat_select_and_overrun():
    reserved, dynamic = ReservedLayer(capacity=6), DynamicLayer()
    for layer in (reserved, dynamic):
        layer.update(*states(1, 3, seed=0))  # a shared prefix, one row
        layer.batch_repeat_interleave(4)
        layer.update(*states(4, 2, seed=1))  # the rows' own tokens
    assert_same(reserved, dynamic)
    buffer = reserved.key_buffer
    for step in range(4):  # the 4th step passes the reserved 6 positions: the buffer grows
        for layer in (reserved, dynamic):
            out = layer.update(*states(4, 1, seed=10 + step))
        assert_same(reserved, dynamic)
        torch.testing.assert_close(out[0], dynamic.keys, rtol=0, atol=0)
        if step == 0:  # within capacity the new states are written in place, no new buffer
            assert reserved.key_buffer is buffer
    assert reserved.key_buffer.shape[-2] > 6
    keep = torch.tensor([0, 2])
    for layer in (reserved, dynamic):
        layer.batch_select_indices(keep)
        layer.update(*states(2, 1, seed=99))
    assert_same(reserved, dynamic)
    reserved.reset()
    assert reserved.get_seq_length() == 0 and reserved.key_buffer is None


def test_a_model_gives_the_same_logits_with_either_cache():
    model = load_backbone(load_spec("specs/tiny.yaml").backbone).model
    ids = torch.randint(3, 200, (3, 7), generator=torch.Generator().manual_seed(0))
    logits = {}
    for name, cache in (("dynamic", DynamicCache(config=model.config)), ("reserved", reserved_cache(model.config, 9))):
        assert any(isinstance(layer, ReservedLayer) for layer in cache.layers) == (name == "reserved")
        with torch.inference_mode():
            steps = [model(input_ids=ids, cache=cache, use_cache=True).logits[:, -1]]
            for position in range(4):  # past the 9 reserved positions at the 3rd step
                steps.append(model(input_ids=ids[:, position : position + 1], cache=cache, use_cache=True).logits[:, -1])
        logits[name] = torch.stack(steps)
    torch.testing.assert_close(logits["reserved"], logits["dynamic"], rtol=0, atol=0)


def test_decoding_reserves_the_cache_on_a_cpu_and_leaves_it_to_transformers_on_a_gpu():
    model = load_backbone(load_spec("specs/tiny.yaml").backbone).model
    on_cpu = decoding_cache(model, 12)
    assert on_cpu.layers and all(type(layer) is ReservedLayer and layer.capacity == 12 for layer in on_cpu.layers)
    # Only the device is read; a stand-in avoids needing a GPU here.
    on_gpu = decoding_cache(SimpleNamespace(device=torch.device("cuda"), config=model.config), 12)
    assert on_gpu.layers and all(type(layer) is DynamicLayer for layer in on_gpu.layers)
