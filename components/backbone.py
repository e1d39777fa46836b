"""Loading the frozen causal LLM (the backbone) and its tokenizer from wherever the spec says it lives.

Sources: a hub id (online only), a local Hugging Face folder, a GGUF file, a GGUF file inside an installed
Python package (our embedded default), or a tiny random model built in code (tests). A GGUF file is
dequantised once into a cached safetensors folder keyed by the file's SHA-256, because transformers takes
tens of seconds to dequantise and cannot `save_pretrained` the result directly.

Every backbone carries a fingerprint, so that a saved LLM2Vec-Gen model can check that it is being loaded on
the same weights it was trained on.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerFast

from components.spec import BackboneSpec, RandomBackboneSpec

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class BackboneError(RuntimeError):
    """The backbone named by the spec cannot be found or loaded; the message says which key and why."""


@dataclass
class Backbone:
    model: PreTrainedModel  # a causal LM, frozen, in eval mode
    tokenizer: PreTrainedTokenizerFast
    spec: BackboneSpec
    fingerprint: str  # identifies the exact weights


def default_cache_dir() -> Path:
    return Path(os.environ.get("LLM2VEC_GEN_CACHE", Path.home() / ".cache" / "llm2vec-gen-ray"))


def load_backbone(spec: BackboneSpec, cache_dir: Path | None = None) -> Backbone:
    if spec.source == "random":
        assert spec.random is not None
        model, tokenizer = build_random_backbone(spec.random)
        fingerprint = _weights_fingerprint(model)  # of the float32 weights, so that it does not depend on dtype
        return _finish(model.to(_DTYPES[spec.dtype]), tokenizer, spec, fingerprint=fingerprint)
    if spec.source == "hub":
        return _load_hub(spec)
    folder, fingerprint = resolve_folder(spec, cache_dir)
    return _load_folder(folder, spec, fingerprint)


def resolve_folder(spec: BackboneSpec, cache_dir: Path | None = None) -> tuple[Path, str]:
    """The local Hugging Face folder of a folder, gguf or package backbone and its weights' fingerprint, without
    loading the weights (a GGUF is converted on first use)."""
    if spec.source == "folder":
        folder = Path(spec.name).expanduser()
        if not (folder / "config.json").is_file():
            raise BackboneError(f"backbone.name: not a Hugging Face model folder (no config.json): {folder}")
        return folder, folder_fingerprint(folder)
    if spec.source == "package":
        gguf = locate_package_file(spec.name, spec.file)
    elif spec.source == "gguf":
        gguf = Path(spec.name).expanduser()
        if not gguf.is_file():
            raise BackboneError(f"backbone.name: GGUF file not found: {gguf}")
    else:
        raise BackboneError(f"backbone.source '{spec.source}' has no local folder")
    folder = convert_gguf(gguf, cache_dir or default_cache_dir())
    return folder, json.loads((folder / "source.json").read_text())["sha256"]


# ------------------------------------------------------------------------------------------ GGUF sources


def locate_package_file(package: str, pattern: str) -> Path:
    """The one file matching `pattern` inside an installed package's folder, found without importing it."""
    try:
        found = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise BackboneError(f"backbone.name: Python package '{package}' is not installed (pip install it)")
    folder = Path(next(iter(found.submodule_search_locations)))
    matches = sorted(folder.glob(pattern))
    if len(matches) != 1:
        listing = ", ".join(p.name for p in matches) or "none"
        raise BackboneError(f"backbone.file: '{pattern}' must match exactly one file in {folder}; matched {listing}")
    return matches[0]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_gguf(gguf: Path, cache_dir: Path) -> Path:
    """Dequantise `gguf` once into `<cache>/gguf/<sha>` (safetensors + tokenizer); later calls return the folder."""
    sha = file_sha256(gguf)
    target = cache_dir / "gguf" / sha[:16]
    if (target / "source.json").is_file():
        return target
    log.info("converting %s to safetensors in %s (once)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A model loaded from GGUF refuses save_pretrained; rebuilding it from its config with the
    # dequantised tensors gives an ordinary model that saves normally.
    config = quantized.config
    for attribute in ("quantization_config", "gguf_file"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), assign=True, strict=False)
    plain.tie_weights()
    plain.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    (staging / "source.json").write_text(json.dumps({"gguf": gguf.name, "sha256": sha}, indent=2))
    try:
        os.replace(staging, target)
    except OSError:  # another process finished the same conversion first
        shutil.rmtree(staging, ignore_errors=True)
    return target


# ------------------------------------------------------------------------------------- folders and the hub


def folder_fingerprint(folder: Path) -> str:
    """Hash of the config plus, per weight file, its name, size and first and last MiB (cheap on 16 GB models)."""
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for weights in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        size = weights.stat().st_size
        digest.update(f"{weights.name}:{size}".encode())
        with open(weights, "rb") as handle:
            digest.update(handle.read(1 << 20))
            handle.seek(max(0, size - (1 << 20)))
            digest.update(handle.read(1 << 20))
    return digest.hexdigest()


def _load_folder(folder: Path, spec: BackboneSpec, fingerprint: str) -> Backbone:
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=_DTYPES[spec.dtype], attn_implementation=spec.attn_implementation
    )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return _finish(model, tokenizer, spec, fingerprint)


def _load_hub(spec: BackboneSpec) -> Backbone:
    try:
        model = AutoModelForCausalLM.from_pretrained(
            spec.name, revision=spec.revision, dtype=_DTYPES[spec.dtype], attn_implementation=spec.attn_implementation
        )
        tokenizer = AutoTokenizer.from_pretrained(spec.name, revision=spec.revision)
    except OSError as err:
        raise BackboneError(
            f"backbone.name: cannot load '{spec.name}' from the hub ({err}). Offline? "
            "Use source: folder (a local copy) or gguf."
        ) from None
    commit = getattr(model.config, "_commit_hash", None) or spec.revision or "unknown"
    return _finish(model, tokenizer, spec, fingerprint=f"hub:{spec.name}@{commit}")


def _finish(model: PreTrainedModel, tokenizer, spec: BackboneSpec, fingerprint: str) -> Backbone:
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return Backbone(model=model, tokenizer=tokenizer, spec=spec, fingerprint=fingerprint)


def _weights_fingerprint(model: PreTrainedModel) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------- tiny random backbones

_CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (one token per UTF-8 byte, ChatML specials) that needs no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = _CHATML
    return tokenizer


def build_random_backbone(spec: RandomBackboneSpec) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    tokenizer = build_byte_tokenizer()
    sizes = dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_position_embeddings,
        initializer_range=spec.initializer_range,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if spec.architecture == "qwen3":
        sizes["head_dim"] = spec.hidden_size // spec.num_heads
    config = AutoConfig.for_model(spec.architecture, **sizes)
    # Seeded locally so that building a test model never disturbs the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    return model, tokenizer
