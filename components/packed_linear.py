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

Weights that are exactly a GGUF block quantization's (the embedded default's) go one step further: they are kept
in their blocks and rebuilt exactly inside a small kernel (components/block_linear.py), a quarter of the bytes or
less; `pack_linears` takes that form where it applies and MKL's packing for the other layers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn

from components import block_linear


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
    """Decoding copies of a model's linear weights; inside `with`, those layers multiply through them."""

    modules: list[nn.Linear]
    forwards: list[Callable[[torch.Tensor], torch.Tensor]]
    formats: list[str]  # per module: "mkl" (packed float32), "q4_1" or "q8_0" (components/block_linear.py)
    nbytes: int  # of the decoding copies

    def __enter__(self) -> PackedLinears:
        for module, forward in zip(self.modules, self.forwards, strict=True):
            # An instance attribute shadows nn.Linear.forward; nn.Module.__call__ looks it up on the instance.
            module.forward = forward
        return self

    def __exit__(self, *exc) -> None:
        for module in self.modules:
            module.__dict__.pop("forward", None)

    def describe(self) -> str:
        counts = Counter(self.formats)
        return f"{self.nbytes / 2**20:.0f} MiB: " + ", ".join(f"{n} {name}" for name, n in sorted(counts.items()))


def pack_linears(model: nn.Module, rows: int) -> PackedLinears | None:
    """Decoding copies of `model`'s frozen fp32 CPU linear weights (block form where exact, else MKL-packed for
    `rows` rows), or None where neither applies."""
    modules = [module for module in model.modules() if packable(module)]
    if not modules:  # a model on a GPU, or one being trained: nothing to copy, no kernel to build
        return None
    use_blocks, use_mkl = block_linear.kernel() is not None, mkl_packing_available()
    kept, forwards, formats, nbytes = [], [], [], 0
    with torch.no_grad():
        for module in modules:
            blocks = block_linear.block_weight(module.weight) if use_blocks else None
            if blocks is not None:
                forwards.append(_block_forward(module, blocks))
                formats.append(blocks.format)
                nbytes += blocks.nbytes
            elif use_mkl:
                packed = torch.ops.mkl._mkl_reorder_linear_weight(module.weight, rows)
                forwards.append(_packed_forward(module, packed, rows))
                formats.append("mkl")
                nbytes += module.weight.numel() * module.weight.element_size()
            else:
                continue
            kept.append(module)
    return PackedLinears(kept, forwards, formats, nbytes) if kept else None


def _plain_only(hidden: torch.Tensor) -> bool:
    # autograd has no formula for either kernel; both take float32 on the CPU only.
    return hidden.dtype != torch.float32 or hidden.device.type != "cpu" or torch.is_grad_enabled() and hidden.requires_grad


def _packed_forward(module: nn.Linear, packed: torch.Tensor, rows: int):
    weight, bias = module.weight, module.bias

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        if _plain_only(hidden):
            return nn.functional.linear(hidden, weight, bias)
        return torch.ops.mkl._mkl_linear(hidden, packed, weight, bias, rows)

    return forward


def _block_forward(module: nn.Linear, blocks: block_linear.BlockWeight):
    weight, bias = module.weight, module.bias
    multiply = block_linear.multiplier(blocks, bias)
    most = block_linear.MAX_ROWS * blocks.in_features

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        if _plain_only(hidden) or hidden.numel() > most:
            return nn.functional.linear(hidden, weight, bias)  # a prefill: many rows, bound by compute, not bytes
        return multiply(hidden)

    return forward
