"""The pieces of the official recipe that are plain functions: the LR schedule, gradient checkpointing."""

from __future__ import annotations

import pytest
import torch
from transformers import get_linear_schedule_with_warmup

from components.training import lr_factor


@pytest.mark.parametrize(("warmup", "total"), [(100, 20000), (10, 50), (0, 7), (1, 1)])
def test_linear_schedule_is_transformers_get_linear_schedule_with_warmup(warmup, total):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = get_linear_schedule_with_warmup(optimizer, warmup, total)
    for step in range(total + 3):  # past the end too: the stop step may exceed nothing, but must not go negative
        assert lr_factor(step, warmup, total, "linear") == pytest.approx(reference.get_last_lr()[0], abs=1e-12), step
        optimizer.step()
        reference.step()


def test_linear_schedule_at_the_official_stop_step():
    # The paper stops at step 5,000 of a 20,000-step schedule with 100 warmup steps: 0.75x the peak LR, where our
    # earlier cosine was at 0.86x.
    assert lr_factor(5000, 100, 20000, "linear") == pytest.approx(15000 / 19900)
    assert lr_factor(5000, 100, 20000, "cosine") == pytest.approx(0.8577, abs=1e-4)
    assert lr_factor(0, 100, 20000, "linear") == 0.0 and lr_factor(0, 100, 20000, "cosine") == pytest.approx(0.01)


def test_constant_schedule_warms_up_then_holds():
    assert [lr_factor(step, 4, 100, "constant") for step in (0, 3, 4, 99, 500)] == [0.25, 1.0, 1.0, 1.0, 1.0]


def test_unknown_schedule_is_an_error():
    with pytest.raises(ValueError, match="training.schedule"):
        lr_factor(5, 1, 10, "step")


ARCHITECTURES = ["llama", "qwen2", "qwen3"]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("cached", [True, False])
def test_gradient_checkpointing_gives_the_same_losses_and_gradients(make_tiny_model, architecture, cached):
    model = make_tiny_model(architecture)
    model.cache_query_prefix = cached
    queries = ["short", "a much longer query that pads the others", "mid length one"]
    teacher = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    batch = model.collate(queries, ["a", "a longer answer here", "ccc"], teacher, 32)
    mlp_calls = []
    hook = model.backbone.base_model.layers[0].mlp.register_forward_pre_hook(lambda *_: mlp_calls.append(1))

    def run(checkpointing: bool):
        model.gradient_checkpointing = checkpointing
        model.zero_grad()
        mlp_calls.clear()
        losses = model(batch)
        losses.total.backward()
        return losses, [p.grad.clone() for p in model.trainable_parameters()], len(mlp_calls)

    try:
        plain, plain_grads, plain_calls = run(False)
        checked, checked_grads, checked_calls = run(True)
    finally:
        hook.remove()
        model.gradient_checkpointing = False
    # The checkpointed passes really recomputed: layer 0's MLP ran again in the backward pass of each of them
    # (reconstruction; the encoding pass too when it is not the cached one).
    assert checked_calls == plain_calls + (1 if cached else 2)
    assert checked.total.item() == pytest.approx(plain.total.item(), rel=1e-6)
    assert checked.reconstruction.item() == pytest.approx(plain.reconstruction.item(), rel=1e-6)
    for with_checkpoint, without in zip(checked_grads, plain_grads, strict=True):
        torch.testing.assert_close(with_checkpoint, without, atol=1e-6, rtol=1e-5)
    # Leaving the context gives the layers their own forward back.
    assert all("forward" not in vars(layer) for layer in model.backbone.base_model.layers)


def test_gradient_checkpointing_refuses_a_kv_cache(make_tiny_model):
    from transformers import DynamicCache

    from components.checkpointing import checkpointed_layers

    model = make_tiny_model("llama")
    embeds = torch.randn(1, 3, model.config.hidden_size, requires_grad=True)
    with checkpointed_layers(model.backbone), pytest.raises(RuntimeError, match="KV cache"):
        model.backbone.base_model(inputs_embeds=embeds, cache=DynamicCache(config=model.backbone.config), use_cache=True)
