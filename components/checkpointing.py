"""Gradient checkpointing of the frozen backbone's decoder layers (training.gradient_checkpointing).

Inside `checkpointed_layers(backbone)`, each decoder layer keeps only its input for the backward pass and recomputes
its activations there (torch.utils.checkpoint, non-reentrant): the memory of a pass drops from all layers'
activations to one layer's plus the layers' inputs, for about one more forward pass of time.

Not transformers' own gradient_checkpointing_enable: that one checkpoints only in training mode (our frozen backbone
stays in eval mode, dropout off) and silently drops any KV cache, which the encoding pass reads (the query prefix's
keys and values, components/model.py compression_states). A checkpointed layer must not write a cache either: its
recompute would write it twice. So only passes without a cache are checkpointed (the reconstruction pass, an uncached
encoding pass); the cached pass of the K special tokens keeps its activations, which are K positions per layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def decoder_layers(backbone: nn.Module) -> nn.ModuleList:
    """The backbone's stack of decoder layers (Llama, Qwen2, Qwen3 and the like: base_model.layers)."""
    layers = getattr(backbone.base_model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"gradient checkpointing: {type(backbone).__name__} has no base_model.layers to checkpoint")
    return layers


@contextlib.contextmanager
def checkpointed_layers(backbone: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Run the backbone's decoder layers under activation checkpointing while inside (when grad is enabled)."""
    if not enabled or not torch.is_grad_enabled():
        yield
        return
    layers = decoder_layers(backbone)
    for layer in layers:
        # An instance attribute shadows the class's forward for this layer only; removed again below.
        layer.forward = partial(_checkpointed_forward, layer.forward)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def _checkpointed_forward(forward, *args, **kwargs):
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is not None:
        raise RuntimeError("gradient checkpointing: a checkpointed pass must not use a KV cache (it would be written twice)")
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)
