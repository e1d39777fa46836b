"""Generated tokens per second: our generation code against a plain `model.generate` loop, on this machine.

    python -m benchmarks.generation [--queries 64] [--rounds 1] [--spec SPEC] [--set key=value ...]

Both answer the same real queries (NQ-open, selected as the generate stage selects them) with the real backbone
of specs/smollm2-135m.yaml, the same decoding settings (greedy; max_new_tokens and batch_size from the spec) and
the same chat-rendered prompts:
    plain  batches of batch_size queries in their given order, each through model.generate with left padding:
           what a straightforward generation script does
    ours   the generate stage's code, run in-process without Ray (the comparison is of generation, not of actor
           start-up): components.generation.length_batches cuts the prompts into length-grouped batches, and
           decode_batch, the function the stage's actors run on each batch, answers them, through the decoding
           copy of the linear weights an actor makes once when it starts (generation.pack_weights: SmolLM2's
           GGUF blocks, rebuilt exactly in components/block_linear.py's kernel; the time to make it is printed,
           not counted, like the model load of either side)
Both run with the same number of torch threads, by default the CPUs one generation actor gets
(generation.num_cpus_per_actor); on a machine with a GPU both run on it, as a generation actor with a GPU does
(`--set backbone.dtype=bfloat16` for its usual precision). Tokens counted are the new tokens before EOS. The
machine may be shared, so the two are interleaved batch by batch (batch i of plain, then batch i of ours, alternating which goes first): a burst
of load from another process falls on both. Wall-clock and process-CPU-time rates are printed; the last line,
`generation ratio: X.XX`, is ours over plain in wall-clock tokens per second.

What bounds the ratio here: most SmolLM2 answers to NQ-open run to max_new_tokens, so every batch of either
kind takes all its decoding steps. Ours saves the prefill of the prompts' shared prefix (the chat template and
its default system prompt), padding, part of the cost of steps once most rows of a batch have finished, and
most of the memory traffic of every step's matrix products: a step of 16 rows is bound by streaming the weights,
4 bytes each in float32 for the plain loop, 0.625 in their Q4_1 blocks (components/block_linear.py). It cannot
save the steps the answers need. `identical responses` counts answers equal to the plain loop's.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from components.backbone import load_backbone
from components.generation import decode_batch, length_batches, render_prompt, stop_token_ids, tokenize_prompts
from components.packed_linear import pack_linears
from components.queries import load_queries
from components.spec import DataSpec
from workflows._cli import add_spec_arguments, spec_from_args

SPEC = "specs/smollm2-135m.yaml"
QUERIES = "../shared/data/nq_open/NQ-open.dev.jsonl"


@torch.inference_mode()
def plain_batch(model, tokenizer, queries, generation) -> list[tuple[str, int]]:
    """One fixed-order batch through model.generate: (response, new tokens before EOS) per query."""
    tokenizer.padding_side = "left"
    eos = stop_token_ids(model, tokenizer)
    prompts = [render_prompt(tokenizer, query, generation) for query in queries]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    out = model.generate(
        **batch, max_new_tokens=generation.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    answers = []
    for row in out[:, batch.input_ids.shape[1] :].tolist():
        kept = next((i for i, token in enumerate(row) if token in eos), len(row))
        answers.append((tokenizer.decode(row[:kept], skip_special_tokens=True), kept))
    return answers


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.generation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1, help="repeat the interleaved runs and add up the times")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both (default: one actor's CPUs)")
    add_spec_arguments(parser, default=SPEC)
    args = parser.parse_args(argv)

    spec = spec_from_args(args)
    if spec is None:
        raise SystemExit(2)
    generation = spec.generation
    torch.set_num_threads(args.threads or max(1, int(generation.num_cpus_per_actor)))
    queries = load_queries(
        DataSpec.model_validate({"sources": [{"path": QUERIES, "text_field": "question"}], "limit": args.queries})
    ).texts
    backbone = load_backbone(spec.backbone)
    model, tokenizer = backbone.model, backbone.tokenizer
    if torch.cuda.is_available():  # as a generation actor with a GPU does
        model.to("cuda")
    size = generation.batch_size
    on_gpu = model.device.type == "cuda"
    device = torch.cuda.get_device_name() if on_gpu else f"CPU, torch threads {torch.get_num_threads()}"
    print(f"{len(queries)} NQ-open queries, {args.spec}{' ' + ' '.join(args.set) if args.set else ''}: max_new_tokens "
          f"{generation.max_new_tokens}, batch_size {size}, greedy; {device} {model.dtype}; ours without Ray")
    started = time.perf_counter()
    packed = pack_linears(model, size) if generation.pack_weights else None
    print(f"decoding weights: {f'{packed.describe()}, in {time.perf_counter() - started:.1f}s' if packed else 'plain'}")
    ours_context = packed or contextlib.nullcontext()
    with ours_context:
        decode_batch(model, tokenizer, tokenize_prompts(tokenizer, queries[:2]), generation.model_copy(
            update={"max_new_tokens": 4}))  # warm-up

    seconds = {"plain": 0.0, "ours": 0.0}
    cpu_seconds = {"plain": 0.0, "ours": 0.0}
    for _ in range(args.rounds):
        started, cpu_started = time.perf_counter(), time.process_time()
        prompts = tokenize_prompts(tokenizer, [render_prompt(tokenizer, query, generation) for query in queries])
        groups = length_batches([len(prompt) for prompt in prompts], size)
        seconds["ours"] += time.perf_counter() - started
        cpu_seconds["ours"] += time.process_time() - cpu_started
        plain_answers, our_answers = [None] * len(queries), [None] * len(queries)
        for index in range(max(len(groups), -(-len(queries) // size))):
            fixed = list(range(index * size, min((index + 1) * size, len(queries))))
            runs = [("plain", fixed), ("ours", groups[index] if index < len(groups) else [])]
            for name, rows in runs if index % 2 == 0 else runs[::-1]:
                if not rows:
                    continue
                started, cpu_started = time.perf_counter(), time.process_time()
                if name == "plain":
                    answers = plain_batch(model, tokenizer, [queries[i] for i in rows], generation)
                else:
                    with ours_context:
                        answers = [(r.response, r.response_tokens) for r in
                                   decode_batch(model, tokenizer, [prompts[i] for i in rows], generation)]
                if on_gpu:
                    torch.cuda.synchronize()
                seconds[name] += time.perf_counter() - started
                cpu_seconds[name] += time.process_time() - cpu_started
                for row, answer in zip(rows, answers, strict=True):
                    (plain_answers if name == "plain" else our_answers)[row] = answer
        tokens = {"plain": sum(n for _, n in plain_answers), "ours": sum(n for _, n in our_answers)}

    rates = {name: tokens[name] * args.rounds / seconds[name] for name in seconds}
    cpu_rates = {name: tokens[name] * args.rounds / cpu_seconds[name] for name in seconds}
    for name in ("plain", "ours"):
        print(f"{name:5s}: {tokens[name] * args.rounds} tokens in {seconds[name]:.1f}s = {rates[name]:.1f} tokens/s "
              f"(process CPU time {cpu_seconds[name]:.1f}s = {cpu_rates[name]:.1f} tokens per CPU second)")
    same = sum(a[0] == b[0] for a, b in zip(plain_answers, our_answers, strict=True))
    print(f"identical responses: {same}/{len(queries)}")
    # CPU time is what the process would take alone, whatever else runs on the machine (with one thread; with
    # more, threads waiting for each other burn CPU too).
    print(f"ratio by CPU time: {cpu_rates['ours'] / cpu_rates['plain']:.2f}")
    print(f"generation ratio: {rates['ours'] / rates['plain']:.2f}")


if __name__ == "__main__":
    main()
