"""Decoding through weights kept in the blocks a GGUF checkpoint quantized them in, rebuilt exactly on the fly.

A GGUF backbone's weights (the embedded default's SmolLM2 file is Q4_1, its embedding Q8_0) were dequantized once
into float32, and that float32 copy is what the model multiplies by. Each weight there is, exactly in float32,

    Q4_1   w = d_b * q + m_b      q in 0..15,      d_b, m_b fp16, one pair per block b of 32 inputs of a row
    Q8_0   w = d_b * q            q in -127..127,  d_b fp16

`block_weight` finds those factors from the float32 matrix alone and keeps a matrix in block form only if
rebuilding it reproduces every weight bit for bit; anything else (a bf16 checkpoint, a fine-tuned layer) stays as
it is. Decoding a batch multiplies a few rows by every matrix of the LLM, so on a CPU a step is bound by
streaming the weights from memory: 4 bytes per weight in float32 against 0.625 (Q4_1) or 1.06 (Q8_0) here.
components/csrc/block_linear.cpp rebuilds each weight with one fused multiply-add (d*q is exact in float32, so
the sum rounds once, as the dequantizer's float32 `d * q + m` did) and multiplies in float32; only the order in
which a row's products are added differs from MKL's, a float rounding difference of the size two BLAS kernels
already have between them.

The kernel is C++ (AVX-512), compiled once per machine with the system's g++ into the project cache and called
through ctypes. Where it cannot be built or run (no compiler, no AVX-512), `kernel()` is None and decoding keeps
MKL's packed float32 path (components/packed_linear.py).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from components.backbone import default_cache_dir

log = logging.getLogger(__name__)

BLOCK = 32  # inputs per quantization block (GGUF's Q4_0/Q4_1/Q8_0)
PANEL = 16  # outputs per kernel panel: one AVX-512 register of float32
MAX_ROWS = 16  # rows the kernel keeps in registers; more (a prefill) multiply by the float32 weight
SOURCE = Path(__file__).parent / "csrc" / "block_linear.cpp"
COMPILE = ["-O3", "-shared", "-fPIC", "-fopenmp", "-std=c++17"]


@dataclass(frozen=True)
class BlockWeight:
    """A (out_features, in_features) matrix in the kernel's layout (see components/csrc/block_linear.cpp)."""

    format: str  # "q4_1" or "q8_0"
    codes: torch.Tensor  # q4_1: uint8 (N/16, K/32, 16, 16) nibble pairs; q8_0: int8 (N/16, K/32, 32, 16)
    scales: torch.Tensor  # fp16; q4_1: (N/16, K/32, 2, 16) d then m; q8_0: (N/16, K/32, 16)
    out_features: int
    in_features: int

    @property
    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scales.numel() * self.scales.element_size()


# ------------------------------------------------------------------------------------------ finding the blocks


def q4_1_factors(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(q uint8 (N, K), d fp16 (N, K/32), m fp16 (N, K/32)) with d*q + m == weight exactly, or None."""
    return _by_rows(weight, _q4_1_rows)


def q8_0_factors(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(q int8 (N, K), d fp16 (N, K/32)) with d*q == weight exactly, or None."""
    return _by_rows(weight, _q8_0_rows)


def _q4_1_rows(blocks: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    # The quantizer maps a block's minimum to q = 0 (so m is the minimum itself) and its maximum to q = 15.
    low, high = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)  # (rows, K/32, 1)
    step = ((high - low) / 15).half().float()
    q = torch.where(step > 0, (blocks - low) / torch.where(step > 0, step, 1), 0).round().clamp(0, 15)
    if not _same_bits(step * q + low, blocks) or not _same_bits(low.half().float(), low):
        return None
    return q.to(torch.uint8).flatten(1), step.half().flatten(1), low.half().flatten(1)


def _q8_0_rows(blocks: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    # The quantizer maps the block's largest magnitude to +-127.
    step = blocks.abs().amax(-1, keepdim=True) / 127  # (rows, K/32, 1)
    q = torch.where(step > 0, blocks / torch.where(step > 0, step, 1), 0).round()
    if not _same_bits(step.half().float(), step) or q.abs().max() > 127 or not _same_bits(step * q, blocks):
        return None
    return q.to(torch.int8).flatten(1), step.half().flatten(1)


def _by_rows(weight: torch.Tensor, factor, rows: int = 2048) -> tuple[torch.Tensor, ...] | None:
    """`factor` over (rows, K/32, 32) slices of the weight's blocks, concatenated; None as soon as one slice fails.

    Slices bound the temporaries (a 151k-token embedding would need several GiB at once) and let a matrix that is
    not block-quantized fail on its first slice."""
    if weight.dim() != 2 or weight.dtype != torch.float32 or weight.device.type != "cpu":
        return None
    n, k = weight.shape
    if n % PANEL or k % BLOCK:
        return None
    blocks = weight.detach().reshape(n, k // BLOCK, BLOCK)
    parts = []
    for start in range(0, n, rows):
        rows_blocks = blocks[start : start + rows]
        part = factor(rows_blocks) if torch.isfinite(rows_blocks).all() else None
        if part is None:
            return None
        parts.append(part)
    return tuple(torch.cat(pieces) for pieces in zip(*parts, strict=True))


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    # Compared as integers: -0.0 and 0.0 are different weights to a bit-for-bit claim.
    return torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


# -------------------------------------------------------------------------------------- the kernel's layout


def q4_1_layout(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = q.shape
    # (N, K) -> (panel, 16 outputs, block, 16 input pairs, 2) -> (panel, block, pair, output, 2)
    pairs = q.reshape(n // PANEL, PANEL, k // BLOCK, BLOCK // 2, 2).permute(0, 2, 3, 1, 4)
    codes = (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous()
    scales = torch.stack([_panel_scales(d), _panel_scales(m)], dim=2).contiguous()
    return codes, scales


def q8_0_layout(q: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = q.shape
    codes = q.reshape(n // PANEL, PANEL, k // BLOCK, BLOCK).permute(0, 2, 3, 1).contiguous()
    return codes, _panel_scales(d).contiguous()


def _panel_scales(scales: torch.Tensor) -> torch.Tensor:
    n, blocks = scales.shape  # (N, K/32) -> (panel, block, 16 outputs)
    return scales.reshape(n // PANEL, PANEL, blocks).permute(0, 2, 1)


def block_weight(weight: torch.Tensor) -> BlockWeight | None:
    """`weight` in block form if it is exactly Q4_1 or Q8_0 (Q4_1 first: the smaller), else None."""
    n, k = weight.shape if weight.dim() == 2 else (0, 0)
    factors = q4_1_factors(weight)
    if factors is not None:
        return BlockWeight("q4_1", *q4_1_layout(*factors), n, k)
    factors = q8_0_factors(weight)
    if factors is not None:
        return BlockWeight("q8_0", *q8_0_layout(*factors), n, k)
    return None


# ------------------------------------------------------------------------------------------------ the kernel


@cache
def kernel() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use into the project cache; None (with the reason logged) if it cannot be."""
    try:
        library = ctypes.CDLL(str(_build()))
    except (OSError, subprocess.SubprocessError, RuntimeError) as error:
        log.warning("block_linear: kernel unavailable, decoding keeps float32 weights (%s)", error)
        return None
    if not library.block_linear_supported():
        log.info("block_linear: this CPU lacks AVX-512; decoding keeps float32 weights")
        return None
    pointer, integer = ctypes.c_void_p, ctypes.c_int
    for function in (library.q4_1_linear, library.q8_0_linear):
        function.argtypes = [pointer, integer, integer, integer, pointer, pointer, pointer, pointer, integer]
        function.restype = integer
    return library


def _build() -> Path:
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler!r}) on PATH")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\n".join([SOURCE.read_text(), " ".join(COMPILE), version]).encode()).hexdigest()[:16]
    target = default_cache_dir() / "kernels" / f"block_linear-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several Ray actors may build at once: each compiles to its own file and renames it into place (atomic).
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        result = subprocess.run(
            [compiler, *COMPILE, "-o", str(built), str(SOURCE)], capture_output=True, text=True, timeout=300
        )
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {SOURCE.name}: {result.stderr.strip()[-2000:]}")
        os.replace(built, target)
    return target


def multiplier(weight: BlockWeight, bias: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """hidden (..., K) -> hidden @ W^T + bias through the kernel, with everything but the rows looked up once.

    A decoding step calls this ~200 times (SmolLM2: 7 projections x 30 layers + the head), so the per-call work is
    kept to a reshape, an allocation and the C call; the caller passes float32 CPU rows, 1..MAX_ROWS of them
    (`block_linear` checks that for other callers)."""
    library = kernel()
    if library is None:
        raise RuntimeError("block_linear: the kernel is not available on this machine")
    function = library.q4_1_linear if weight.format == "q4_1" else library.q8_0_linear
    k, n = weight.in_features, weight.out_features
    bias = bias.detach().float().contiguous() if bias is not None else None
    # The closure holds the tensors, so the addresses stay valid for as long as it lives.
    codes, scales = weight.codes.data_ptr(), weight.scales.data_ptr()
    bias_address = bias.data_ptr() if bias is not None else None

    def multiply(hidden: torch.Tensor) -> torch.Tensor:
        flat = hidden.reshape(-1, k).contiguous()  # (M, K)
        out = torch.empty(flat.shape[0], n)  # (M, N)
        status = function(
            flat.data_ptr(), flat.shape[0], k, n, codes, scales, bias_address, out.data_ptr(), torch.get_num_threads()
        )
        if status != 0:
            raise RuntimeError(f"block_linear: the kernel refused shapes {tuple(flat.shape)} x {weight.format} ({n}, {k})")
        return out.view(*hidden.shape[:-1], n)

    multiply.tensors = (weight, bias)  # keeps them alive with the closure (addresses above)
    return multiply


def block_linear(hidden: torch.Tensor, weight: BlockWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """hidden (..., K) float32 on the CPU, at most MAX_ROWS rows in all -> (..., N), = hidden @ W^T + bias."""
    rows = hidden.numel() // max(1, hidden.shape[-1]) if hidden.dim() else 0
    if hidden.dtype != torch.float32 or hidden.device.type != "cpu" or not 1 <= rows <= MAX_ROWS or (
        hidden.shape[-1] != weight.in_features
    ):
        raise ValueError(f"block_linear: takes 1..{MAX_ROWS} float32 CPU rows of {weight.in_features}, got "
                         f"{tuple(hidden.shape)} {hidden.dtype} on {hidden.device}")
    return multiplier(weight, bias)(hidden)
