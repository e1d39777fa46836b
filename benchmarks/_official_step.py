"""The official LLM2Vec-Gen training step, run inside the official package's own venv by benchmarks/training.py.

    <official-venv>/bin/python -I benchmarks/_official_step.py WORKDIR --checkpointing on|off

This file imports nothing from this repository: it runs on the `llm2vec-gen==0.1.3` package with its own pins
(transformers 4.56.2, peft 0.18.0) and torch 2.13.0 CPU. The model is built as the package's scripts/train.py
builds it for LLM2Vec-Gen training (conf model/default + training/llm2vec-gen):
    encoder   AutoModel + resize_token_embeddings + PEFT TrainableTokens on the special-token ids
    decoder   a separate AutoModelForCausalLM copy, every parameter frozen (freeze_decoder_fully)
    heads     ProjectionModel reconstruction (H -> H) and alignment (H -> D) ("linear" pooling)
    model     EncoderDecoderModel(encoding_mode="last_<C>_tokens"); the Trainer's default
              gradient_checkpointing (use_reentrant=False), or none with --checkpointing off
A step is what its LLM2VecGenTrainer.compute_loss + the HF Trainer do per micro batch: the EncoderDecoderModel
call (the decoder's CE on [pads][z][answer]), compute_mse_loss(states.mean(1), teacher), backward, gradient
clipping, AdamW. Batches are laid out as its CustomCollator(padding="longest") lays them out, everything
left-padded: query = question ids + the special-token ids, answer = response ids (+ EOS), labels = the answer
ids with padding -100.

Protocol: one JSON command per line on stdin, one JSON reply per line on stdout (library output goes to stderr):
    {"cmd": "check", "rows": [...]}  forward + backward, no update: losses, gradients written to WORKDIR
    {"cmd": "step", "rows": [...]}   one timed training step: wall and process CPU seconds
    {"cmd": "finish"}                peak RSS, then exit
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--checkpointing", choices=["on", "off"], required=True)
    args = parser.parse_args()
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything the libraries print goes to stderr; stdout carries only the replies

    def reply(message: dict) -> None:
        protocol.write(json.dumps(message) + "\n")
        protocol.flush()

    try:
        worker = OfficialWorker(args.workdir, args.checkpointing == "on")
    except Exception:
        reply({"error": traceback.format_exc()})
        return
    reply({"ready": True, **worker.describe()})
    for line in sys.stdin:
        command = json.loads(line)
        try:
            if command["cmd"] == "check":
                reply(worker.check(command["rows"], command["grads_file"]))
            elif command["cmd"] == "step":
                reply(worker.step(command["rows"]))
            elif command["cmd"] == "finish":
                reply({"max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
                return
            else:
                reply({"error": f"unknown command {command['cmd']!r}"})
        except Exception:
            reply({"error": traceback.format_exc()})


class OfficialWorker:
    def __init__(self, workdir: Path, checkpointing: bool):
        import torch
        from llm2vec_gen.models import EncoderDecoderModel, ProjectionModel
        from peft import TrainableTokensConfig, get_peft_model
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))  # set by benchmarks/training.py
        self.torch = torch
        meta = json.loads((workdir / "meta.json").read_text())
        self.meta, self.checkpointing = meta, checkpointing
        self.rows = meta["rows"]
        self.teacher = load_file(workdir / "teacher.safetensors")["teacher"]
        folder = workdir / "backbone-transformers4"

        # As scripts/train.py: tokenizer + special tokens, config.num_special_tokens, resized encoder vocabulary.
        tokenizer = AutoTokenizer.from_pretrained(folder)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        tokenizer.add_special_tokens({"additional_special_tokens": meta["special_tokens"]})
        special_ids = tokenizer.convert_tokens_to_ids(meta["special_tokens"])
        if special_ids != meta["special_ids"] or tokenizer.pad_token_id != meta["pad_id"]:
            raise ValueError(f"token ids differ from ours: {special_ids} pad {tokenizer.pad_token_id} vs {meta['special_ids']} pad {meta['pad_id']}")
        self.special_ids, self.pad_id = special_ids, tokenizer.pad_token_id
        config = AutoConfig.from_pretrained(folder)
        config.num_special_tokens = len(special_ids)
        config.special_tokens_ids = special_ids
        config.torch_dtype = torch.float32
        encoder = AutoModel.from_pretrained(folder, config=config, torch_dtype=torch.float32)
        encoder.resize_token_embeddings(len(tokenizer))
        encoder = get_peft_model(encoder, peft_config=TrainableTokensConfig(token_indices=special_ids))
        decoder = AutoModelForCausalLM.from_pretrained(folder, config=config, torch_dtype=torch.float32)
        for parameter in decoder.parameters():
            parameter.requires_grad = False
        hidden = config.hidden_size
        reconstruction = ProjectionModel(input_dim=hidden, output_dim=hidden, dtype=torch.float32)
        alignment = ProjectionModel(input_dim=hidden, output_dim=meta["embedding_dim"], dtype=torch.float32)
        self.model = EncoderDecoderModel(
            encoder_model=encoder,
            decoder_model=decoder,
            encoding_mode=f"last_{meta['compression_tokens']}_tokens",
            reconstruction_mlp=reconstruction,
            alignment_mlp=alignment,
            save_decoder=False,
        )

        # The same starting point as ours: our special rows into the TrainableTokens values, our projections.
        start = load_file(workdir / "init.safetensors")
        deltas = [p for name, p in encoder.named_parameters() if "trainable_tokens_delta" in name]
        if len(deltas) != 1:
            raise ValueError(f"expected one trainable_tokens_delta, found {len(deltas)}")
        self.named = {
            "special_embeddings": deltas[0],
            "reconstruction.weight": reconstruction.projection.weight,
            "reconstruction.bias": reconstruction.projection.bias,
            "alignment.weight": alignment.projection.weight,
            "alignment.bias": alignment.projection.bias,
        }
        with torch.no_grad():
            for name, parameter in self.named.items():
                parameter.copy_(start[name])

        if checkpointing:  # what the HF Trainer does with the package's default gradient_checkpointing: true
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if len(self.params) != len(self.named):
            raise ValueError(f"expected {len(self.named)} trainable tensors, found {len(self.params)}")
        # The HF Trainer's default optimizer with torch >= 2.8: adamw_torch_fused (no weight decay by default).
        self.optimizer = torch.optim.AdamW(self.params, lr=meta["lr"], weight_decay=meta["weight_decay"], fused=True)

    def describe(self) -> dict:
        import peft
        import transformers

        return {
            "versions": f"llm2vec-gen 0.1.3, transformers {transformers.__version__}, peft {peft.__version__}, torch {self.torch.__version__}",
            "trainable": sum(p.numel() for p in self.params),
            "attn": self.model.decoder_model.config._attn_implementation,
        }

    def collate(self, indices: list[int]):
        torch = self.torch
        queries = [self.rows[i]["query_ids"] + self.special_ids for i in indices]
        answers = [self.rows[i]["response_ids"] for i in indices]
        query_ids, query_mask = left_pad(torch, queries, self.pad_id)
        answer_ids, answer_mask = left_pad(torch, answers, self.pad_id)
        labels = answer_ids.masked_fill(answer_mask == 0, -100)
        return query_ids, query_mask, answer_ids, answer_mask, labels, self.teacher[indices]

    def losses(self, indices: list[int]):
        from llm2vec_gen.losses import compute_mse_loss

        query_ids, query_mask, answer_ids, answer_mask, labels, teacher = self.collate(indices)
        states, outputs = self.model(
            query_input_ids=query_ids,
            query_attention_mask=query_mask,
            answer_input_ids=answer_ids,
            answer_attention_mask=answer_mask,
            labels=labels,
        )
        weighted_alignment, alignment = compute_mse_loss(states.mean(dim=1), teacher, mse_loss_weight=self.meta["weights"][1])
        total = self.meta["weights"][0] * outputs["loss"] + weighted_alignment
        return total, outputs["loss"], alignment

    def check(self, indices: list[int], grads_file: str) -> dict:
        from safetensors.torch import save_file

        total, reconstruction, alignment = self.losses(indices)
        total.backward()
        save_file({name: p.grad.detach().clone() for name, p in self.named.items()}, grads_file)
        self.optimizer.zero_grad(set_to_none=True)
        return {"reconstruction": reconstruction.item(), "alignment": alignment.item()}

    def step(self, indices: list[int]) -> dict:
        started, cpu = time.perf_counter(), time.process_time()
        total, _, _ = self.losses(indices)
        total.backward()
        self.torch.nn.utils.clip_grad_norm_(self.params, self.meta["grad_clip"])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu}


def left_pad(torch, rows: list[list[int]], pad_id: int):
    length = max(len(row) for row in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, length - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[index, length - len(row) :] = 1
    return ids, mask


if __name__ == "__main__":
    main()
