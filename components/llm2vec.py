"""LLM2Vec: a decoder LLM turned into a text encoder (BehnamGhader et al., 2024), on transformers 5 and peft.

Three steps make the encoder, and this file has each as a small piece:
    1. bidirectional attention   every token attends to every (non-padding) token of its text
    2. MNTP                      masked next-token prediction: a masked token at position i is predicted from the
                                 output at position i - 1 (the LM head is used as it was pretrained), trained as a
                                 LoRA adapter, then merged into the weights
    3. unsupervised SimCSE       a text's two dropout views are positives, the other texts of the batch negatives:
                                 a second LoRA adapter on top of the merged MNTP weights
An embedding is the mean of the last hidden states over every attended token of the text (BOS included where the
tokenizer adds one), not normalised: what the official LLM2Vec-Gen trainer aligns to (get_teacher_embeddings); with
pooling "mean_text", over the text's own tokens only, as the llm2vec package's LLM2Vec.encode pools. The last adapter
stays unmerged by default, as the official trainer loads it. tests/test_llm2vec_official.py compares both poolings
with the llm2vec package itself (fixtures made by benchmarks/official_llm2vec.py).

Bidirectional attention. transformers 5 builds the attention mask inside the model (masking_utils.create_causal_mask)
and returns a mask that is already 4-D unchanged; the sdpa kernel is told to be causal only when it gets no mask and
the attention module says `is_causal`. So we pass a 4-D padding-only mask (B, 1, T, T) and set `is_causal = False`
on every attention module; this holds for the eager and sdpa implementations of the architectures listed in
BIDIRECTIONAL_MODEL_TYPES, whose forward passes the mask through (a test checks that a token's state changes
when a later token changes). Other architectures or attention kernels are refused rather than silently left causal.

Published layout (McGill-NLP/LLM2Vec-<model>-mntp, ...-mntp-unsup-simcse): a folder or hub repo with
adapter_config.json (its base_model_name_or_path names the base model) and adapter_model.safetensors whose keys are
those of peft applied to the decoder's base model (`base_model.model.layers.0.self_attn.q_proj.lora_A.weight`),
plus tokenizer files. The MNTP adapter is merged into the base weights, then each further adapter is applied on top.
A folder of our own may instead hold a merged model and a LLM2VEC_FILE naming its model folder and adapters.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# model_type -> verified: the decoder's forward hands a 4-D mask to every attention layer unchanged.
BIDIRECTIONAL_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")  # flash-attention kernels take no 4-D mask: they would stay causal
LLM2VEC_FILE = "llm2vec_teacher.json"  # in a teacher folder of ours: {"model": "<subfolder>", "adapters": [...]}
# The LoRA targets of the official LLM2Vec recipes (attention and MLP projections of every layer).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LLM2VecError(ValueError):
    """An LLM2Vec model cannot be built as asked; the message names the folder, adapter or architecture and why."""


# ------------------------------------------------------------------------------------ bidirectional attention


def check_bidirectional_support(config) -> None:
    """Refuse a model whose attention we do not know how to make bidirectional (it would silently stay causal)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in BIDIRECTIONAL_MODEL_TYPES:
        raise LLM2VecError(
            f"architecture '{model_type}' has no known way to make its attention bidirectional here; "
            f"supported: {', '.join(BIDIRECTIONAL_MODEL_TYPES)}"
        )
    implementation = getattr(config, "_attn_implementation", None) or "sdpa"
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise LLM2VecError(
            f"attention implementation '{implementation}' cannot be made bidirectional (it takes no 4-D mask); "
            f"use one of {', '.join(ATTENTION_IMPLEMENTATIONS)}"
        )


def make_bidirectional(decoder: torch.nn.Module) -> torch.nn.Module:
    """Mark every attention module of `decoder` non-causal (in place); the mask comes from bidirectional_mask."""
    check_bidirectional_support(decoder.config)
    changed = 0
    for module in decoder.modules():
        if hasattr(module, "is_causal") and module is not decoder:
            module.is_causal = False
            changed += 1
    if changed == 0:
        raise LLM2VecError(f"{type(decoder).__name__}: found no attention module to make bidirectional")
    return decoder


def bidirectional_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, T) 1/0 padding mask -> (B, 1, T, T) additive mask: every query sees every real key, no padded key.

    Padding rows still see the real keys, so no softmax row is empty (no NaN); they are never pooled."""
    keys = attention_mask[:, None, None, :].to(torch.bool)  # (B, 1, 1, T)
    mask = torch.zeros(keys.shape, dtype=dtype, device=attention_mask.device)
    mask = mask.masked_fill(~keys, torch.finfo(dtype).min)
    return mask.expand(-1, 1, attention_mask.shape[1], -1)


def encoder_states(decoder: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, H) last hidden states of the decoder's base model with bidirectional attention.

    Texts are padded on the right, so a text's positions are 0..n-1 whatever the batch (padding changes nothing)."""
    dtype = next(decoder.parameters()).dtype
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0).expand_as(input_ids)
    out = decoder(input_ids=input_ids, attention_mask=bidirectional_mask(attention_mask, dtype),
                  position_ids=positions, use_cache=False)
    return out.last_hidden_state


def mean_pool(hidden: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, H), (B, T) -> (B, H): the mean over the pooled positions; a text with none gets a zero vector."""
    weights = pool_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)


@dataclass
class TokenBatch:
    input_ids: torch.Tensor  # (B, T), right-padded
    attention_mask: torch.Tensor  # (B, T) 1 on real tokens
    pool_mask: torch.Tensor  # (B, T) 1 on the text's own tokens (real and not special: no BOS/EOS)


def tokenize(tokenizer, texts: Sequence[str], max_tokens: int, device: torch.device | str = "cpu") -> TokenBatch:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    encoded = tokenizer(list(texts), padding=True, truncation=True, max_length=max_tokens,
                        return_special_tokens_mask=True, return_tensors="pt")
    attention = encoded["attention_mask"]
    pool = attention * (1 - encoded["special_tokens_mask"])
    return TokenBatch(encoded["input_ids"].to(device), attention.to(device), pool.to(device))


def embed_batch(decoder: torch.nn.Module, batch: TokenBatch, pooling: str = "mean_text") -> torch.Tensor:
    """(B, H) mean-pooled bidirectional states of one tokenized batch (with grad if the caller allows it): over every
    attended token (pooling "mean") or over the text's own tokens ("mean_text")."""
    if batch.input_ids.shape[1] == 0:
        hidden_size = decoder.config.hidden_size
        return torch.zeros(batch.input_ids.shape[0], hidden_size, device=batch.input_ids.device)
    pool = batch.attention_mask if pooling == "mean" else batch.pool_mask
    return mean_pool(encoder_states(decoder, batch.input_ids, batch.attention_mask), pool)


@torch.inference_mode()
def embed_texts(decoder, tokenizer, texts: Sequence[str], batch_size: int, max_tokens: int,
                normalize: bool = False, pooling: str = "mean_text") -> np.ndarray:
    """(N, H) float32 vectors of `texts`, in input order; batches of similar length waste little on padding."""
    device = next(decoder.parameters()).device
    out = np.zeros((len(texts), decoder.config.hidden_size), dtype=np.float32)
    order = sorted(range(len(texts)), key=lambda i: (-len(texts[i]), i))
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        vectors = embed_batch(decoder, tokenize(tokenizer, [texts[i] for i in chosen], max_tokens, device), pooling).float()
        if normalize:
            vectors = F.normalize(vectors, dim=-1)
        out[chosen] = vectors.cpu().numpy()
    return out


# ------------------------------------------------------------------------------------------------- loading


@dataclass
class Located:
    """Where an LLM2Vec model's pieces are: a base (a model folder / hub id), adapters to apply in order."""

    base: str
    adapters: list[str]
    tokenizer: str


def locate(name: str, adapters: Sequence[str] = ()) -> Located:
    """Resolve `name` (hub id or folder: an adapter in the published layout, a model, or a folder of ours with
    LLM2VEC_FILE) and the further `adapters` into the base model and the adapters to apply, in order."""
    folder = Path(name).expanduser()
    chain: list[str] = []
    if folder.is_dir() and (folder / LLM2VEC_FILE).is_file():
        listing = json.loads((folder / LLM2VEC_FILE).read_text())
        inner = str(folder / listing["model"])
        own = [str(folder / adapter) for adapter in listing.get("adapters", [])]
        located = locate(inner, [*own, *adapters])
        return located
    adapter_config = _adapter_config(name)
    if adapter_config is not None:
        base = _resolve_relative(adapter_config.base_model_name_or_path, folder if folder.is_dir() else None)
        if not base:
            raise LLM2VecError(f"teacher.name: adapter {name} does not name its base model (base_model_name_or_path)")
        chain.append(name)
        # The adapter repo's tokenizer, as the official trainer takes it (a hub repo: the published ones ship it).
        tokenizer = name if not folder.is_dir() or _has_tokenizer(name) else base
    else:
        base, tokenizer = name, name
    chain += [str(Path(a).expanduser()) if Path(a).expanduser().exists() else a for a in adapters]
    return Located(base=base, adapters=chain, tokenizer=tokenizer)


def load_llm2vec(name: str, adapters: Sequence[str] = (), dtype: str = "float32", attn_implementation: str = "sdpa",
                 device: str | torch.device = "cpu", merge_last: bool = True):
    """(bidirectional decoder base model in eval mode, tokenizer): the base, each adapter merged in order; with
    merge_last False the last adapter stays a LoRA branch (peft), as the official LLM2Vec-Gen trainer loads it."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    located = locate(name, adapters)
    try:
        config = AutoConfig.from_pretrained(located.base)
    except (OSError, ValueError) as err:
        raise LLM2VecError(f"teacher.name: cannot load the base model '{located.base}' of {name}: {err}") from None
    config._attn_implementation = attn_implementation  # checked before any weight is read
    check_bidirectional_support(config)
    model = AutoModel.from_pretrained(located.base, dtype=_DTYPES[dtype], attn_implementation=attn_implementation)
    for index, adapter in enumerate(located.adapters):
        last = index == len(located.adapters) - 1
        model = merge_adapter(model, adapter) if merge_last or not last else attach_adapter(model, adapter)
    tokenizer = AutoTokenizer.from_pretrained(located.tokenizer)
    return make_bidirectional(model).to(device).eval(), tokenizer


def merge_adapter(model: torch.nn.Module, adapter: str) -> torch.nn.Module:
    """`model` with the LoRA adapter at `adapter` merged into its weights, after checking that it fits."""
    return attach_adapter(model, adapter).merge_and_unload()


def attach_adapter(model: torch.nn.Module, adapter: str):
    """`model` with the LoRA adapter at `adapter` beside its weights (a peft model), after checking that it fits."""
    from peft import PeftModel

    check_adapter_fits(model, adapter)
    try:
        return PeftModel.from_pretrained(model, adapter)
    except (ValueError, RuntimeError, KeyError) as err:
        raise LLM2VecError(f"teacher.adapters: adapter {adapter} does not fit the base model: {err}") from None


def check_adapter_fits(model: torch.nn.Module, adapter: str) -> None:
    """Every LoRA tensor of `adapter` must name a linear layer of `model` with matching sizes; else a clear error
    (peft alone may skip unknown keys with only a warning, and then the adapter silently does nothing)."""
    from peft.utils import load_peft_weights

    try:
        weights = load_peft_weights(adapter, device="cpu")
    except (OSError, ValueError) as err:
        raise LLM2VecError(f"teacher.adapters: cannot read adapter weights at {adapter}: {err}") from None
    base = getattr(model.config, "_name_or_path", "") or type(model).__name__
    modules = dict(model.named_modules())
    lora = {key: value for key, value in weights.items() if ".lora_A." in key or ".lora_B." in key}
    if not lora:
        raise LLM2VecError(f"teacher.adapters: {adapter} holds no LoRA weights (keys like ...q_proj.lora_A.weight)")
    for key, value in lora.items():
        path, part = key.removeprefix("base_model.model.").rsplit(".lora_", 1)
        layer = modules.get(path)
        if not isinstance(layer, torch.nn.Linear):
            raise LLM2VecError(f"teacher.adapters: adapter {adapter} does not fit the base model {base}: it has "
                               f"weights for '{path}', which is not a linear layer of {type(model).__name__}")
        expected = layer.in_features if part.startswith("A") else layer.out_features
        got = value.shape[1] if part.startswith("A") else value.shape[0]
        if got != expected:
            side = "input" if part.startswith("A") else "output"
            raise LLM2VecError(f"teacher.adapters: adapter {adapter} does not fit the base model {base}: '{path}' has "
                               f"{side} size {expected}, the adapter's lora_{part.split('.')[0]} expects {got}")


def _adapter_config(name: str):
    from peft import PeftConfig

    folder = Path(name).expanduser()
    if folder.is_dir():
        return PeftConfig.from_pretrained(str(folder)) if (folder / "adapter_config.json").is_file() else None
    if folder.exists():
        raise LLM2VecError(f"teacher.name: {name} is a file, not a model or adapter folder")
    try:
        return PeftConfig.from_pretrained(name)  # a hub repo that is an adapter (needs the hub)
    except (OSError, ValueError):
        return None  # not an adapter (or offline): loaded as a model, whose error says what is missing


def _resolve_relative(base: str | None, folder: Path | None) -> str | None:
    """A base named relative to the adapter folder (our own teachers) or absolutely, else the hub id as given."""
    if not base:
        return base
    if folder is not None and (folder / base).is_dir():
        return str((folder / base).resolve())
    return base


def _has_tokenizer(name: str) -> bool:
    folder = Path(name).expanduser()
    return folder.is_dir() and any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))


# ------------------------------------------------------------------------------------------------ objectives


def mask_token_id(tokenizer, kind: str) -> int:
    """The token that replaces masked inputs: LLM2Vec's "blank" is '_' (decoders have no mask token), or EOS."""
    if kind == "eos":
        return tokenizer.eos_token_id
    ids = tokenizer.encode("_", add_special_tokens=False)
    if len(ids) != 1:
        raise LLM2VecError(f"teacher.train.mntp.mask_token: '_' is {len(ids)} tokens for this tokenizer; use eos")
    return ids[0]


def mntp_inputs(batch: TokenBatch, mask_id: int, vocab_size: int, probability: float,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) for MNTP, BERT-style: each of the text's own tokens is chosen with `probability`; a chosen
    token becomes the mask token 80% of the time, a random token 10%, stays 10%; labels are -100 elsewhere."""
    ids = batch.input_ids
    chosen = (torch.rand(ids.shape, generator=generator) < probability).to(ids.device) & batch.pool_mask.bool()
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    draw = torch.rand(ids.shape, generator=generator).to(ids.device)
    inputs = torch.where(chosen & (draw < 0.8), torch.full_like(ids, mask_id), ids)
    random_tokens = torch.randint(vocab_size, ids.shape, generator=generator).to(ids.device)
    inputs = torch.where(chosen & (draw >= 0.8) & (draw < 0.9), random_tokens, inputs)
    return inputs, labels


def mntp_loss(hidden: torch.Tensor, lm_head: torch.nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """Token i is predicted from the output at position i - 1: logits[:, :-1] against labels[:, 1:].

    Only the positions before a masked token go through the LM head (the vocabulary projection is the big cost)."""
    targets = labels[:, 1:]
    where = targets != -100  # (B, T-1)
    if not where.any():
        return hidden.sum() * 0.0  # nothing masked in this batch: a zero that keeps the graph
    logits = lm_head(hidden[:, :-1][where])  # (M, V)
    return F.cross_entropy(logits.float(), targets[where])


def simcse_loss(first: torch.Tensor, second: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE over the batch: row i of `first` against every row of `second`, the positive on the diagonal."""
    scores = F.normalize(first.float(), dim=-1) @ F.normalize(second.float(), dim=-1).T / temperature  # (B, B)
    return F.cross_entropy(scores, torch.arange(first.shape[0], device=first.device))


def set_attention_dropout(decoder: torch.nn.Module, probability: float) -> None:
    """SimCSE's dropout views: attention dropout in every layer (active only in train mode)."""
    for module in decoder.modules():
        if hasattr(module, "attention_dropout") and isinstance(module.attention_dropout, (int, float)):
            module.attention_dropout = probability
    decoder.config.attention_dropout = probability


def lora_config(r: int, alpha: float, dropout: float, targets: Sequence[str] = LORA_TARGETS):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none")

