"""Fixtures and reference outputs for comparing `teacher.kind: llm2vec` with the official `llm2vec` package.

    python -m benchmarks.official_llm2vec [--out tests/fixtures/llm2vec_official] [--architectures llama qwen2]

Builds, inside a venv of its own (~/.cache/llm2vec-gen-ray/llm2vec-venv: llm2vec 0.2.3, which pins transformers
<= 4.44; torch 2.13 CPU from local disk; the pins that do not resolve are installed with --no-deps), for each of a
tiny random Llama (a word-level tokenizer that adds BOS) and a tiny random Qwen2 (a byte-level BPE built like Qwen2's,
no BOS):
    base/     the causal LM, as a base model is published
    mntp/     the MNTP LoRA adapter in the published layout (adapter files + the base config.json + tokenizer; its
              adapter_config names ../base), random non-zero LoRA weights
    simcse/   the SimCSE LoRA adapter on top of the merged MNTP weights, random non-zero LoRA weights
and embeds texts.json (64 texts of 1 to ~70 words) with the official code:
    attended_float32.npy   LLM2Vec.from_pretrained(mntp, peft_model_name_or_path=simcse, merge_peft=False), then
                           the official LLM2Vec-Gen trainer's target (llm2vec_gen/losses.py get_teacher_embeddings):
                           the model's last hidden states on the left-padded tokens (BOS added), averaged over every
                           attended token; batches of 16 padded to the longest
    attended_bfloat16.npy  the same in bfloat16
    encode_float32.npy     LLM2Vec.encode (pooling mean, skip_instruction): the mean over the text's own tokens
    bidirectional_{float32,bfloat16}.npy   Qwen2 only: attended_*, the same model given a padding-only 4-D mask (the
                           package's Qwen2 path is causal on eager and sdpa attention: see padding_only_mask)
tests/test_llm2vec_official.py compares our teacher with these files; no second venv is needed to run it.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

VENV = Path.home() / ".cache" / "llm2vec-gen-ray" / "llm2vec-venv"
PINS = ["torch==2.13.0", "transformers==4.44.2", "tokenizers>=0.19,<0.20", "peft==0.13.2", "accelerate==1.0.1",
        "huggingface-hub>=0.23.2,<0.26", "safetensors", "numpy<2.3", "pyyaml", "regex", "requests", "tqdm", "packaging",
        "filelock", "psutil"]
PACKAGE = "llm2vec==0.2.3"  # its own pins (transformers <= 4.44.2 and datasets, evaluate, scikit-learn): --no-deps
WORDS = ("the a of to and in is was for on that with as by at from it an be this which or are were has have "
         "not but its their model text answer query language word sentence meaning vector embedding learn train "
         "data large small fast slow river mountain city music paper science history water light energy time "
         "people world year day night red blue green house road tree bird stone cloud rain sun moon star").split()
ARCHITECTURES = ("llama", "qwen2")


def texts(count: int = 64) -> list[str]:
    rng = random.Random(0)
    lengths = [1, 2, 3, 70] + [rng.randint(1, 60) for _ in range(count - 4)]
    return [" ".join(rng.choice(WORDS) for _ in range(n)) for n in lengths]


def official_python() -> Path:
    python = VENV / "bin" / "python"
    probe = "import llm2vec, transformers; assert transformers.__version__ == '4.44.2'"
    if python.exists() and subprocess.run([str(python), "-c", probe], capture_output=True).returncode == 0:
        return python
    shutil.rmtree(VENV, ignore_errors=True)
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *PINS], check=True)  # torch pinned: never a CUDA build
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", PACKAGE], check=True)
    subprocess.run([str(python), "-c", probe], check=True)
    return python


# ------------------------------------------------------------------------ the official side (llm2vec's venv)


def build_tokenizer(architecture: str, folder: Path):
    from transformers import PreTrainedTokenizerFast

    core = llama_tokenizer() if architecture == "llama" else qwen2_tokenizer()
    if architecture == "llama":
        specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    else:
        specials = {"eos_token": "<|endoftext|>"}
    # Like Llama's and Qwen2's tokenizers: no token_type_ids (LLM2Vec passes every returned tensor to the model).
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, model_input_names=["input_ids", "attention_mask"],
                                        **specials)
    tokenizer.save_pretrained(folder)
    return tokenizer


def llama_tokenizer():
    """A word-level tokenizer that puts BOS before every text, as Llama's does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {token: index for index, token in enumerate(["<s>", "</s>", "<unk>", *WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return core


def qwen2_tokenizer():
    """A small byte-level BPE with Qwen2's pipeline: transformers 5 rebuilds that pipeline for any `model_type: qwen2`
    folder (transformers/models/qwen2/tokenization_qwen2.py: NFC, the split regex below, byte-level with no prefix
    space) from the file's vocab and merges, so both transformers versions give these ids (a word-level file would
    not survive the rebuild)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
             r"\s+(?!\S)|\s+")
    core = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    core.normalizer = normalizers.NFC()
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    core.decoder = decoders.ByteLevel()
    # Whole words (with and without the leading space) need ~700 merges; 400 leaves some words in pieces, as real
    # BPE vocabularies do.
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator([" ".join(WORDS), *(" " + word for word in WORDS)], trainer=trainer)
    return core


def random_lora(model, seed: int, folder: Path, base_name: str) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, bias="none",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:  # peft starts B at zero (a no-op adapter): both random, so the adapter matters
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    peft_model.save_pretrained(folder)
    adapter_config = json.loads((folder / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = base_name
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))


def official_side(out: Path, architectures: list[str]) -> None:
    import os

    import numpy as np
    import torch
    from llm2vec import LLM2Vec
    from transformers import AutoModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    corpus = json.loads((out / "texts.json").read_text())
    for architecture in architectures:
        root = out / architecture
        shutil.rmtree(root, ignore_errors=True)
        base, mntp, simcse = root / "base", root / "mntp", root / "simcse"
        for folder in (base, mntp, simcse):
            folder.mkdir(parents=True)
        tokenizer = build_tokenizer(architecture, base)
        settings = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                        initializer_range=0.1, tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.eos_token_id)
        torch.manual_seed(1 if architecture == "llama" else 2)
        if architecture == "llama":
            causal = LlamaForCausalLM(LlamaConfig(**settings, bos_token_id=tokenizer.bos_token_id))
        else:
            causal = Qwen2ForCausalLM(Qwen2Config(**settings))
        causal.save_pretrained(base)
        # MNTP: a LoRA on the base decoder, published with the base config and the tokenizer beside the adapter.
        random_lora(AutoModel.from_pretrained(base), 10, mntp, "../base")
        shutil.copy(base / "config.json", mntp / "config.json")
        tokenizer.save_pretrained(mntp)
        # SimCSE: a LoRA on the merged MNTP weights.
        from peft import PeftModel

        merged = PeftModel.from_pretrained(AutoModel.from_pretrained(base), mntp).merge_and_unload()
        random_lora(merged, 20, simcse, "../mntp")

        os.chdir(mntp)  # the adapter names its base relative to itself; transformers resolves it from the cwd
        for dtype in ("float32", "bfloat16"):
            model = LLM2Vec.from_pretrained(str(mntp), peft_model_name_or_path=str(simcse), merge_peft=False,
                                            pooling_mode="mean", torch_dtype=getattr(torch, dtype),
                                            attn_implementation="eager")
            model.eval()
            vectors, bidirectional = [], []
            with torch.no_grad():
                for start in range(0, len(corpus), 16):
                    # llm2vec_gen/dataset/data_collator.py: padding longest, max_length 512, left (train.py); BOS added
                    batch = model.tokenizer(corpus[start : start + 16], padding="longest", max_length=512,
                                            truncation=True, return_tensors="pt")
                    states = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                    vectors.append(attended_mean(states.last_hidden_state, batch["attention_mask"]))
                    if architecture == "qwen2":  # the package's Qwen2 stays causal: see padding_only_mask
                        states = model.model(input_ids=batch["input_ids"],
                                             attention_mask=padding_only_mask(batch["attention_mask"], dtype))
                        bidirectional.append(attended_mean(states.last_hidden_state, batch["attention_mask"]))
            np.save(root / f"attended_{dtype}.npy", torch.cat(vectors).numpy())
            if bidirectional:
                np.save(root / f"bidirectional_{dtype}.npy", torch.cat(bidirectional).numpy())
            if dtype == "float32":
                encoded = model.encode(corpus, batch_size=16, show_progress_bar=False, convert_to_numpy=True)
                np.save(root / "encode_float32.npy", np.asarray(encoded, dtype=np.float32))
        os.chdir(out)
        print(f"{architecture}: official outputs written to {root}", flush=True)


def attended_mean(states, attention_mask):
    """llm2vec_gen/losses.py get_teacher_embeddings: the mean over every attended token."""
    mask = attention_mask.unsqueeze(-1)
    return ((states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)).float()


def padding_only_mask(attention_mask, dtype: str):
    """(B, 1, T, T) additive mask that hides the padding only.

    llm2vec 0.2.3's Qwen2BiModel (llm2vec/models/bidirectional_qwen2.py) sets `is_causal = False` on its attention
    modules but, unlike LlamaBiModel, keeps Qwen2Model._update_causal_mask, which under transformers 4.44.2 turns a 2-D
    mask into a causal 4-D one (eager and sdpa alike; sdpa with no padding gets is_causal=True from the mask being
    None): only flash_attention_2 (a GPU kernel) reads the flag. A 4-D mask passes through _update_causal_mask
    unchanged (_prepare_4d_causal_attention_mask_with_cache_position), so this gives the package's own modules and
    weights the bidirectional attention that their `is_causal = False` asks for."""
    import torch

    kind = getattr(torch, dtype)
    keys = attention_mask[:, None, None, :].bool()
    mask = torch.zeros(keys.shape, dtype=kind).masked_fill(~keys, torch.finfo(kind).min)
    return mask.expand(-1, 1, attention_mask.shape[1], -1)


# ------------------------------------------------------------------------------------------------ the driver


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/llm2vec_official"))
    parser.add_argument("--architectures", nargs="+", choices=ARCHITECTURES, default=list(ARCHITECTURES))
    parser.add_argument("--official-side", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = args.out.resolve()
    if args.official_side:
        official_side(out, args.architectures)
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "texts.json").write_text(json.dumps(texts(), indent=1))
    python = official_python()
    version = subprocess.run([str(python), "-c", "import llm2vec, transformers, peft, torch; "
                              "print(transformers.__version__, peft.__version__, torch.__version__)"],
                             capture_output=True, text=True, check=True).stdout.split()
    subprocess.run([str(python), str(Path(__file__).resolve()), "--official-side", "--out", str(out),
                    "--architectures", *args.architectures], check=True)
    (out / "versions.json").write_text(json.dumps({"llm2vec": PACKAGE.split("==")[1], "transformers": version[0],
                                                   "peft": version[1], "torch": version[2]}, indent=1))


if __name__ == "__main__":
    main()
