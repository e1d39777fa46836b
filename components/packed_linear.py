"""MKL's packed GEMM for the frozen backbone's linear layers, while it decodes on a CPU.

A decoding step multiplies a few rows (one per answer in the batch) by every weight matrix of the LLM. At so few
rows, a plain CPU matmul spends much of its time re-laying the weight out for its kernel on every call. MKL can
do that re-layout once (cblas_sgemm_pack of the B operand; torch exposes it as
`torch.ops.mkl._mkl_reorder_linear_weight` and `_mkl_linear`, the kernels inductor's freezing pass uses for fp32
linears) and reuse it at every step. MKL takes the packed path only for the row count the weights were packed
for (the decoding batch size); other row counts (prefill, a narrowed batch) multiply by the layer's own weight.
Measured on this project's 2-core Xeon, one thread, 16 rows:

    16 x 576 @ 576 x 1536      0.59 ms plain, 0.34 ms packed (weights in cache); 0.69 / 0.54 ms streamed from memory
    16 x 576 @ 576 x 49152     25 ms plain, 17.5 ms packed (the LM head)

A whole SmolLM2 decoding step goes from ~170 to ~130 ms (with components/kv_cache.py); benchmarks/generation.py
has the end-to-end figure. The products agree to float rounding (exactly, at 16 rows here), and greedy answers are identical in the tests
and the benchmark. The cost is memory: a packed copy of every linear weight, about the backbone's size again (513 MiB for
SmolLM2-135M). Only frozen fp32 weights on a CPU with torch's MKL build are packed; anything else keeps its plain
forward, so the same code runs on a GPU untouched.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn


def mkl_packing_available() -> bool:
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


def packable(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        isinstance(module, nn.Linear)
        and weight is not None
        and weight.dtype == torch.float32
        and weight.device.type == "cpu"
        and not weight.requires_grad
    )


@dataclass
class PackedLinears(AbstractContextManager):
    """Packed weights of a model's linear layers; inside `with`, those layers multiply through them."""

    modules: list[nn.Linear]
    packed: list[torch.Tensor]
    rows: int  # the row count the packing was tuned for (the decoding batch size)

    def __enter__(self) -> PackedLinears:
        for module, packed in zip(self.modules, self.packed, strict=True):
            # An instance attribute shadows nn.Linear.forward; nn.Module.__call__ looks it up on the instance.
            module.forward = _packed_forward(module, packed, self.rows)
        return self

    def __exit__(self, *exc) -> None:
        for module in self.modules:
            module.__dict__.pop("forward", None)

    @property
    def nbytes(self) -> int:
        return sum(module.weight.numel() * module.weight.element_size() for module in self.modules)


def pack_linears(model: nn.Module, rows: int) -> PackedLinears | None:
    """Packed copies of `model`'s frozen fp32 CPU linear weights, or None where MKL packing does not apply."""
    if not mkl_packing_available():
        return None
    modules = [module for module in model.modules() if packable(module)]
    if not modules:
        return None
    with torch.no_grad():
        packed = [torch.ops.mkl._mkl_reorder_linear_weight(module.weight, rows) for module in modules]
    return PackedLinears(modules, packed, rows)


def _packed_forward(module: nn.Linear, packed: torch.Tensor, rows: int):
    weight, bias = module.weight, module.bias

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        if hidden.dtype != torch.float32 or hidden.device.type != "cpu" or torch.is_grad_enabled() and hidden.requires_grad:
            return nn.functional.linear(hidden, weight, bias)  # autograd has no formula for the packed kernel
        return torch.ops.mkl._mkl_linear(hidden, packed, weight, bias, rows)

    return forward
