"""The cost of training.gradient_checkpointing on the real SmolLM2-135M backbone: memory and step time.

    python -m benchmarks.gradient_checkpointing [--batch 8] [--response-tokens 512] [--steps 3]

One training micro batch (`--batch` rows: short queries, answers of `--response-tokens` tokens, as the recipes cap
them) goes forward and backward through LLM2VecGen, alternately without and with checkpointing, `--steps` times
each. Per mode it prints:
    saved      bytes of the tensors autograd keeps for the backward pass (a saved_tensors_hooks count: what
               checkpointing exists to cut; on a GPU this is most of a step's peak memory)
    peak RSS   the process's peak resident memory during the step above what it held before (VmHWM, reset per
               step through /proc/self/clear_refs): the real CPU figure, allocator effects included
    step       median wall seconds of forward + backward (the first step, which also grows the heap, left out)
and the ratios on / off. Each mode runs in its own process (a fresh heap), the modes alternating by round.
Losses and gradients are checked equal (they must be: tests/test_fidelity.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from components.backbone import load_backbone
from components.model import LLM2VecGen
from components.spec import load_spec


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def saved_bytes(model: LLM2VecGen, batch) -> int:
    """Bytes of the distinct storages autograd keeps for backward, the frozen weights (already in memory) excluded."""
    weights = {p.untyped_storage().data_ptr() for p in model.backbone.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        losses = model(batch)
    losses.total.backward()
    return sum(storages.values())


def child(mode: bool, args) -> None:
    """One mode in a fresh process, so that neither inherits the other's freed-but-kept heap."""
    torch.manual_seed(0)
    spec = load_spec("specs/smollm2-135m.yaml")
    model = LLM2VecGen.from_spec(spec, embedding_dim=384, backbone=load_backbone(spec.backbone))
    model.gradient_checkpointing = mode
    words = "the model answers the question with a long and detailed passage about history science and art".split()
    responses = [" ".join(words[(i + j) % len(words)] for j in range(args.response_tokens * 2)) for i in range(args.batch)]
    queries = [f"Question number {i}: what happened in the year {1900 + 7 * i}?" for i in range(args.batch)]
    batch = model.collate(queries, responses, torch.randn(args.batch, 384, generator=torch.Generator().manual_seed(1)),
                          args.response_tokens)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = rss_kib("VmRSS")
    seconds = []
    for _ in range(args.steps):
        model.zero_grad()
        started = time.perf_counter()
        losses = model(batch)
        losses.total.backward()
        seconds.append(time.perf_counter() - started)
    peak = rss_kib("VmHWM") - before
    grads = torch.cat([p.grad.flatten() for p in model.trainable_parameters()])
    print(json.dumps({"mode": mode, "seconds": seconds, "peak_kib": peak, "saved": saved_bytes(model, batch),
                      "loss": losses.total.item(), "grads": grads[:: max(1, grads.numel() // 4096)].tolist(),
                      "shape": f"batch {args.batch} x ({batch.query_ids.shape[1]} query + "
                               f"{spec.tokens.thought + spec.tokens.compression} special + {batch.response_ids.shape[1]} answer tokens)",
                      "threads": torch.get_num_threads()}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--response-tokens", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--child", choices=["off", "on"])
    args = parser.parse_args()
    if args.child:
        child(args.child == "on", args)
        return
    runs: dict[bool, list[dict]] = {False: [], True: []}
    for round_ in range(args.rounds):
        for mode in ((False, True) if round_ % 2 == 0 else (True, False)):  # alternating: shared-machine load hits both
            command = [sys.executable, "-m", "benchmarks.gradient_checkpointing", "--child", "on" if mode else "off",
                       "--batch", str(args.batch), "--response-tokens", str(args.response_tokens), "--steps", str(args.steps)]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            runs[mode].append(json.loads(out.strip().splitlines()[-1]))
    print(f"SmolLM2-135M float32 CPU, {runs[False][0]['shape']}, {runs[False][0]['threads']} threads, "
          f"{args.steps} steps x {args.rounds} rounds per mode")
    summary = {}
    for mode in (False, True):
        seconds = statistics.median(s for run in runs[mode] for s in run["seconds"][1:] or run["seconds"])
        peak = max(run["peak_kib"] for run in runs[mode]) / 1024
        saved = runs[mode][0]["saved"] / 2**20
        summary[mode] = (seconds, peak, saved)
        print(f"checkpointing {'on ' if mode else 'off'}: saved for backward {saved:8.1f} MiB  peak RSS +{peak:8.1f} MiB  "
              f"step {seconds:6.2f} s  loss {runs[mode][0]['loss']:.6f}")
    a, b = runs[False][0], runs[True][0]
    same = a["loss"] == b["loss"] and torch.allclose(torch.tensor(a["grads"]), torch.tensor(b["grads"]), atol=1e-6, rtol=1e-5)
    print(f"on/off: saved {summary[True][2] / summary[False][2]:.3f}  peak RSS {summary[True][1] / summary[False][1]:.3f}  "
          f"step time {summary[True][0] / summary[False][0]:.3f}  same losses and gradients: {same}")


if __name__ == "__main__":
    main()
