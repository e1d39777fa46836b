"""The official LLM2Vec-Gen training step, run inside the official package's own venv by benchmarks/training.py.

    <official-venv>/bin/python -I benchmarks/_official_step.py WORKDIR --checkpointing on|off [--dtype float64]

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

--dtype float64 runs the same model, batches and code in float64, for the equality check: the backbone loaded in
float64, the projections and TrainableTokens in float64, and the three float32 casts that the libraries hard-code
taken out (see `exact_float64`, which benchmarks/training.py applies to our model too): the RMSNorm's and the
rotary embedding's, and transformers' `ForCausalLMLoss` upcast of the logits (`logits = logits.float()`, its only
change). Nothing else differs from the float32 run.

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
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    args = parser.parse_args()
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything the libraries print goes to stderr; stdout carries only the replies

    def reply(message: dict) -> None:
        protocol.write(json.dumps(message) + "\n")
        protocol.flush()

    try:
        worker = OfficialWorker(args.workdir, args.checkpointing == "on", args.dtype)
    except Exception:
        reply({"error": traceback.format_exc()})
        return
    reply({"ready": True, **worker.describe()})
    for line in sys.stdin:
        command = json.loads(line)
        try:
            if command["cmd"] == "check":
                reply(worker.check(command["rows"], command["grads_file"], command.get("cap")))
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
    def __init__(self, workdir: Path, checkpointing: bool, dtype: str = "float32"):
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
        dtype = getattr(torch, dtype)
        self.teacher = load_file(workdir / "teacher.safetensors")["teacher"].to(dtype)
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
        config.torch_dtype = dtype
        encoder = AutoModel.from_pretrained(folder, config=config, torch_dtype=dtype)
        encoder.resize_token_embeddings(len(tokenizer))
        encoder = get_peft_model(encoder, peft_config=TrainableTokensConfig(token_indices=special_ids))
        decoder = AutoModelForCausalLM.from_pretrained(folder, config=config, torch_dtype=dtype)
        for parameter in decoder.parameters():
            parameter.requires_grad = False
        hidden = config.hidden_size
        reconstruction = ProjectionModel(input_dim=hidden, output_dim=hidden, dtype=dtype)
        alignment = ProjectionModel(input_dim=hidden, output_dim=meta["embedding_dim"], dtype=dtype)
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

        if dtype == torch.float64:
            exact_float64(encoder)
            exact_float64(decoder)
            decoder.loss_function = float64_causal_lm_loss()
            if decoder.config._attn_implementation != "sdpa":  # eager attention's softmax is float32 too
                raise ValueError(f"float64 check needs sdpa attention, got {decoder.config._attn_implementation}")
        for name, parameter in self.named.items():
            if parameter.dtype != dtype:
                raise ValueError(f"{name} is {parameter.dtype}, not {dtype}")

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

    def collate(self, indices: list[int], cap: int | None = None):
        torch = self.torch
        queries = [self.rows[i]["query_ids"] + self.special_ids for i in indices]
        answers = [self.rows[i]["response_ids"][:cap] for i in indices]  # cap: the answer-length study
        query_ids, query_mask = left_pad(torch, queries, self.pad_id)
        answer_ids, answer_mask = left_pad(torch, answers, self.pad_id)
        labels = answer_ids.masked_fill(answer_mask == 0, -100)
        return query_ids, query_mask, answer_ids, answer_mask, labels, self.teacher[indices]

    def losses(self, indices: list[int], cap: int | None = None):
        from llm2vec_gen.losses import compute_mse_loss

        query_ids, query_mask, answer_ids, answer_mask, labels, teacher = self.collate(indices, cap)
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

    def check(self, indices: list[int], grads_file: str, cap: int | None = None) -> dict:
        from safetensors.torch import save_file

        total, reconstruction, alignment = self.losses(indices, cap)
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


def exact_float64(model) -> int:
    """Take out the float32 casts that transformers hard-codes in a float64 model, on its instances only: the
    RMSNorms (variance in float32, then back) and the rotary embedding (angles position * inv_freq, cos, sin in
    float32). Returns how many modules were changed. The same function runs on both sides of the check.

    The rotary frequencies stay the float32 values both libraries compute (1 / theta ** (2i / d), in float32),
    widened exactly; only the angles and their cos/sin are computed in float64, so RoPE's relative-position
    invariance then holds to float64 rounding (with float32 angles, position p carries an angle error of
    ~p * 6e-8 rad, which differs between left and right padding).
    """
    import types

    import torch

    def norm_forward(self, hidden_states):
        if hidden_states.dtype != torch.float64:
            raise TypeError(f"exact_float64: {type(self).__name__} got {hidden_states.dtype}")
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    @torch.no_grad()
    def rotary_forward(self, x, position_ids):
        if x.dtype != torch.float64:
            raise TypeError(f"exact_float64: {type(self).__name__} got {x.dtype}")
        if getattr(self, "rope_type", "default") != "default":
            raise ValueError(f"exact_float64: rope type {self.rope_type} is not handled")
        inv_freq = self.inv_freq.to(device=x.device, dtype=torch.float64)
        freqs = position_ids[..., None].to(torch.float64) * inv_freq  # (B, L, d/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling

    changed = 0
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm"):
            module.forward = types.MethodType(norm_forward, module)
            changed += 1
        elif name.endswith("RotaryEmbedding"):
            module.forward = types.MethodType(rotary_forward, module)
            changed += 1
    if not changed:
        raise ValueError(f"exact_float64: no RMSNorm or rotary embedding in {type(model).__name__}")
    return changed


def float64_causal_lm_loss():
    """transformers' ForCausalLMLoss with its one float32 upcast of the logits made float64, nothing else changed."""
    import inspect

    from transformers.loss import loss_utils

    source = inspect.getsource(loss_utils.ForCausalLMLoss)
    if source.count("logits = logits.float()") != 1:
        raise ValueError("ForCausalLMLoss changed: its `logits = logits.float()` upcast was not found once")
    namespace = dict(vars(loss_utils))
    exec(source.replace("logits = logits.float()", "logits = logits.double()"), namespace)
    return namespace["ForCausalLMLoss"]


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
