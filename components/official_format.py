"""The official LLM2Vec-Gen checkpoint layout (McGill-NLP/llm2vec-gen 0.1.3), read into our model and written from it.

A released model (`McGill-NLP/LLM2Vec-Gen-Qwen3-8B`, ...) is a folder or hub repo, as EncoderDecoderModel.save_pretrained
plus the training script write it:

    run_config.yml               "key: value" lines (utils.save_args_to_yaml): model_name_or_path (the backbone),
                                 torch_dtype, special_tokens (the K new tokens, in order), encoding_mode, ...
    tokenizer files              the backbone's tokenizer with the K tokens added as additional special tokens, left padding
    encoder/adapter_config.json  a PEFT TrainableTokens adapter: token_indices = the K tokens' ids
    encoder/adapter_model.safetensors   ...embed_tokens.token_adapter.trainable_tokens_delta  (K, H): the K rows
                                 themselves (peft writes them with index_copy over the embedding matrix)
    encoder/config.json          the backbone's config after resize_token_embeddings (its eos_token_id ends decoding)
    reconstruction_mlp           torch.save({"state_dict": {"projection.weight" (H, H), "projection.bias"}, "config"})
    alignment_mlp                the same, (D, H)
    encoder_decoder_config.json  {"encoding_mode": "last_<C>_tokens", "save_decoder": false}

Its encode appends the K tokens to the text, runs the backbone, takes the last C hidden states h, and returns
mean_i alignment(reconstruction(h_i)): our compression_states / project with T = K - C thought tokens. Its decoder is
the backbone itself fed z = reconstruction(h), greedy, stopping at config.eos_token_id (plus <|endoftext|> for Qwen,
<|end_of_text|> for Llama). So one of its checkpoints is one of our models with other file names: the K rows become
special_embeddings, the heads become reconstruction / alignment, and the backbone is loaded once, as for our own folders.

Its instructions are the model card's and the evaluation scripts' (components/prompts.py, set "generative"): the
model card's query instruction "Generate a passage that best answers this question: " and the passage prefix
"Summarize the following passage: " become `query` and `document`.

The heads are pickles (torch.save); they are read with torch.load(weights_only=True), which refuses anything but
tensors and plain containers.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

RUN_CONFIG = "run_config.yml"
ENCODER_DECODER_CONFIG = "encoder_decoder_config.json"
ADAPTER_CONFIG = "encoder/adapter_config.json"
ADAPTER_WEIGHTS = "encoder/adapter_model.safetensors"
ENCODER_CONFIG = "encoder/config.json"
HEADS = ("reconstruction_mlp", "alignment_mlp")
QUERY_INSTRUCTION = "Generate a passage that best answers this question: "  # the model card's retrieval example
# What the official generate adds to config.eos_token_id, by architecture (modeling_encoder_decoder.py).
EXTRA_STOP_IDS = {"llama": [128001], "qwen2": [151643], "qwen3": [151643]}
_DELTA = "trainable_tokens_delta"
_BASE_EMBEDDINGS = "embed_tokens.base_layer.weight"


class OfficialFormatError(ValueError):
    """An official-layout folder that cannot be read: the message names the file and what is wrong with it."""


def is_official(path: str | os.PathLike) -> bool:
    """A folder in the official layout (any of its own files present; our llm2vec_gen.json absent)."""
    folder = Path(path)
    return folder.is_dir() and not (folder / "llm2vec_gen.json").exists() and any(
        (folder / name).exists() for name in (RUN_CONFIG, ENCODER_DECODER_CONFIG, "encoder", *HEADS)
    )


def looks_like_hub_id(reference: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", reference)) and not Path(reference).exists()


def download(repo_id: str) -> Path:
    """A hub repo's files (online only), without a decoder copy: `encoder/`, the heads, configs, tokenizer."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.yml", "*.txt", "*.model", "encoder/*", *HEADS]))
    except Exception as err:  # noqa: BLE001 - network, auth or a wrong name: one message that says which
        raise OfficialFormatError(f"{repo_id}: no such folder here, and not downloadable from the hub "
                                  f"({type(err).__name__}: {err}); offline? pass a local folder") from None


# ------------------------------------------------------------------------------------------------- reading


def read_run_config(folder: Path) -> dict[str, Any]:
    """run_config.yml as save_args_to_yaml writes it: YAML, but for Python reprs some values are tagged objects."""
    path = folder / RUN_CONFIG
    if not path.is_file():
        raise OfficialFormatError(f"{path}: missing (an official LLM2Vec-Gen folder names its backbone and tokens there)")

    class Loader(yaml.SafeLoader):  # a subclass, so the permissive tag below does not leak into yaml.SafeLoader
        pass

    Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)
    text = path.read_text()
    try:
        config = yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError:
        # A value's Python repr that is not YAML (e.g. "<Enum.X: 'x'>") breaks the whole file: read it line by line,
        # each value as YAML where it parses and as text where it does not.
        config = {}
        for line in text.splitlines():
            key, sep, value = line.partition(": ")
            if sep and key and not key.startswith((" ", "#", "-")):
                try:
                    config[key] = yaml.load(value, Loader=Loader)  # noqa: S506
                except yaml.YAMLError:
                    config[key] = value.strip()
    for key in ("model_name_or_path", "special_tokens"):
        if not isinstance(config, dict) or not config.get(key):
            raise OfficialFormatError(f"{path}: has no {key}")
    if not isinstance(config["special_tokens"], list) or not all(isinstance(t, str) for t in config["special_tokens"]):
        raise OfficialFormatError(f"{path}: special_tokens must be a list of strings, got {config['special_tokens']!r}")
    return config


def compression_count(folder: Path, run_config: dict[str, Any]) -> int:
    """C, from encoder_decoder_config.json's encoding_mode (the official default: run_config's, else last_10_tokens)."""
    mode = run_config.get("encoding_mode") or "last_10_tokens"
    path = folder / ENCODER_DECODER_CONFIG
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("save_decoder"):
            raise OfficialFormatError(f"{path}: save_decoder is true (a trained decoder copy); only a frozen decoder "
                                      "shared with the backbone is supported")
        mode = saved.get("encoding_mode", mode)
    match = re.fullmatch(r"last_(\d+)_tokens", str(mode))
    if not match:
        raise OfficialFormatError(f"{path if path.is_file() else folder / RUN_CONFIG}: encoding_mode {mode!r} is not last_<C>_tokens")
    count = int(match.group(1))
    if not 0 < count <= len(run_config["special_tokens"]):
        raise OfficialFormatError(f"{folder}: encoding_mode {mode} needs 1..{len(run_config['special_tokens'])} tokens")
    return count


def read_special_rows(folder: Path, special_tokens: list[str]) -> tuple[torch.Tensor, list[int]]:
    """The K trained rows (K, H) and the token ids they belong to, from the encoder's TrainableTokens adapter."""
    config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise OfficialFormatError(f"{path}: missing (the encoder's PEFT adapter holds the special-token rows)")
    adapter = json.loads(config_path.read_text())
    if adapter.get("peft_type") != "TRAINABLE_TOKENS":
        raise OfficialFormatError(f"{config_path}: peft_type {adapter.get('peft_type')!r}; only TRAINABLE_TOKENS (a frozen "
                                  "backbone plus trained token rows) runs on the one shared backbone")
    tensors = load_file(weights_path)
    # Besides the rows, peft saves the whole (resized) embedding matrix as embed_tokens.base_layer.weight: checked
    # against the backbone by check_embedding_matrix. Anything else (LoRA weights) would change the backbone.
    others = sorted(name for name in tensors if not name.endswith(_DELTA) and not name.endswith(_BASE_EMBEDDINGS))
    if others:
        raise OfficialFormatError(f"{weights_path}: has weights besides the token rows ({others[:3]}...): not a frozen backbone")
    deltas = [tensors[name] for name in sorted(tensors) if name.endswith(_DELTA)]
    if len(deltas) != 1:
        raise OfficialFormatError(f"{weights_path}: expected one {_DELTA}, found {len(deltas)}")
    indices = list(adapter.get("token_indices") or [])
    if len(indices) != len(special_tokens) or deltas[0].shape[0] != len(special_tokens):
        raise OfficialFormatError(f"{config_path}: {len(indices)} token_indices and {deltas[0].shape[0]} rows for the "
                                  f"{len(special_tokens)} special_tokens of {RUN_CONFIG}")
    return deltas[0].float(), indices


def check_embedding_matrix(folder: Path, backbone_embeddings: torch.Tensor) -> None:
    """The embedding matrix saved with the adapter (when peft saved one) must be the backbone's, on the rows both have."""
    tensors = load_file(folder / ADAPTER_WEIGHTS)
    saved = next((tensor for name, tensor in tensors.items() if name.endswith(_BASE_EMBEDDINGS)), None)
    if saved is None:
        return
    rows = min(saved.shape[0], backbone_embeddings.shape[0])
    if saved.shape[1] != backbone_embeddings.shape[1] or not torch.allclose(
        saved[:rows].float(), backbone_embeddings[:rows].float(), atol=1e-2, rtol=1e-2
    ):
        raise OfficialFormatError(f"{folder / ADAPTER_WEIGHTS}: its embedding matrix {tuple(saved.shape)} is not the "
                                  f"backbone's {tuple(backbone_embeddings.shape)} (an adapter for another backbone?)")


def check_tokenizer(folder: Path, special_tokens: list[str], indices: list[int], backbone_tokenizer) -> None:
    """The folder's tokenizer must list exactly the special tokens (the official encode appends its
    additional_special_tokens, not run_config's), hold them at the adapter's ids, and split text as the backbone does."""
    from transformers import AutoTokenizer

    config_path = folder / "tokenizer_config.json"
    try:
        saved = json.loads(config_path.read_text())
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as err:  # noqa: BLE001
        raise OfficialFormatError(f"{config_path}: the tokenizer cannot be read ({type(err).__name__}: {err})") from None
    listed = saved.get("additional_special_tokens", saved.get("extra_special_tokens"))
    if listed != special_tokens:
        raise OfficialFormatError(f"{config_path}: additional_special_tokens {listed} differ from the special_tokens "
                                  f"{special_tokens} of {RUN_CONFIG}")
    ids = tokenizer.convert_tokens_to_ids(special_tokens)
    if ids != indices:
        raise OfficialFormatError(f"{config_path}: the special tokens have ids {ids} in the tokenizer, but "
                                  f"{ADAPTER_CONFIG} trains ids {indices}")
    probe = "Polar bears live on sea ice, 42 km north."
    ours = backbone_tokenizer(probe, split_special_tokens=True)["input_ids"]
    theirs = tokenizer(probe)["input_ids"]
    if ours != theirs:
        raise OfficialFormatError(f"{config_path}: this tokenizer splits text differently from the backbone's "
                                  f"({theirs[:8]}... vs {ours[:8]}...): a tokenizer for another backbone?")


def read_head(folder: Path, name: str, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    path = folder / name
    if not path.is_file():
        raise OfficialFormatError(f"{path}: missing (the {name.split('_')[0]} head)")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        state, config = saved["state_dict"], saved.get("config", {})
    except Exception as err:  # noqa: BLE001
        raise OfficialFormatError(f"{path}: not a ProjectionModel file ({type(err).__name__}: {err})") from None
    if config.get("pooling_mode", "linear") != "linear" or config.get("size", 1) != 1:
        raise OfficialFormatError(f"{path}: pooling_mode {config.get('pooling_mode')!r} size {config.get('size')}; only one "
                                  "linear projection is supported")
    weight, bias = state.get("projection.weight"), state.get("projection.bias")
    if weight is None or bias is None:
        raise OfficialFormatError(f"{path}: no projection.weight / projection.bias")
    if weight.shape[1] != shape[1] or (shape[0] and weight.shape[0] != shape[0]):
        raise OfficialFormatError(f"{path}: projection {tuple(weight.shape)}, expected {shape} for this backbone")
    return {"weight": weight.float(), "bias": bias.float()}


def resolve_backbone(folder: Path, name: str, dtype: str):
    """The BackboneSpec of run_config's model_name_or_path: a folder (relative to the checkpoint, then to the working
    directory, as the official package resolves it) or a hub id."""
    from components.spec import BackboneSpec

    for candidate in (folder / name, Path(name).expanduser()):
        if (candidate / "config.json").is_file():
            return BackboneSpec(source="folder", name=str(candidate.resolve()), dtype=dtype)
    return BackboneSpec(source="hub", name=name, dtype=dtype)


def check_encoder_config(folder: Path, backbone_config) -> list[int]:
    """encoder/config.json must describe the backbone (an adapter for another backbone fails here); its eos ids."""
    path = folder / ENCODER_CONFIG
    if not path.is_file():
        return []
    saved = json.loads(path.read_text())
    for key in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        if key in saved and saved[key] != getattr(backbone_config, key, saved[key]):
            raise OfficialFormatError(f"{path}: {key} {saved[key]!r} but the backbone has {getattr(backbone_config, key)!r} "
                                      "(an adapter trained on another backbone?)")
    eos = saved.get("eos_token_id")
    return [eos] if isinstance(eos, int) else list(eos or [])


def teacher_reference(run_config: dict[str, Any]) -> str:
    """Our config.teacher for the official teacher: the LLM2Vec model (MNTP) and its SimCSE adapter, when named."""
    names = [str(run_config[key]) for key in ("pretrained_teacher_path", "pretrained_teacher_path_2")
             if run_config.get(key) not in (None, "", "None")]
    return "llm2vec:" + ",".join(names) if names else ""


def load_official(path: str | os.PathLike, backbone=None, dtype: str | None = None):
    """An official folder (or hub id) as an LLM2VecGen on our single backbone copy."""
    from components.backbone import load_backbone
    from components.model import LLM2VecGen, ModelConfig
    from components.prompts import PASSAGE_PREFIX, prompt_set

    folder = download(str(path)) if looks_like_hub_id(str(path)) else Path(path)
    run_config = read_run_config(folder)
    special_tokens = run_config["special_tokens"]
    compression = compression_count(folder, run_config)
    rows, indices = read_special_rows(folder, special_tokens)
    saved_dtype = str(run_config.get("torch_dtype") or "float32").removeprefix("torch.")
    spec = resolve_backbone(folder, str(run_config["model_name_or_path"]), dtype or saved_dtype)
    backbone = backbone or load_backbone(spec)
    hidden = backbone.model.config.hidden_size
    eos = check_encoder_config(folder, backbone.model.config)
    if rows.shape[1] != hidden:
        raise OfficialFormatError(f"{folder / ADAPTER_WEIGHTS}: rows of size {rows.shape[1]}, the backbone's hidden size is "
                                  f"{hidden} (an adapter for another backbone?)")
    check_tokenizer(folder, special_tokens, indices, backbone.tokenizer)
    check_embedding_matrix(folder, backbone.model.get_input_embeddings().weight.detach())
    reconstruction = read_head(folder, "reconstruction_mlp", (hidden, hidden))
    alignment = read_head(folder, "alignment_mlp", (0, hidden))
    stop = eos or [backbone.tokenizer.eos_token_id]
    stop = list(dict.fromkeys(stop + EXTRA_STOP_IDS.get(backbone.model.config.model_type, [])))
    prompts = {**prompt_set("generative"), "query": QUERY_INSTRUCTION, "document": PASSAGE_PREFIX}
    config = ModelConfig(
        backbone=backbone.spec,
        backbone_fingerprint=backbone.fingerprint,
        thought_tokens=len(special_tokens) - compression,
        compression_tokens=compression,
        hidden_size=hidden,
        embedding_dim=alignment["weight"].shape[0],
        max_query_tokens=int(run_config.get("max_input_length") or 512) - len(special_tokens),
        prompts=prompts,
        teacher=teacher_reference(run_config),
        special_token_names=list(special_tokens),
        stop_token_ids=stop,
    )
    model = LLM2VecGen(backbone, config)
    state = {"special_embeddings": rows, **{f"reconstruction.{k}": v for k, v in reconstruction.items()},
             **{f"alignment.{k}": v for k, v in alignment.items()}}
    model.load_state_dict(state)
    return model


# ------------------------------------------------------------------------------------------------- writing


def _transformers4_config(config: dict[str, Any]) -> dict[str, Any]:
    """A transformers 5 config dict as the official package's transformers 4.56 reads it (rope_theta, torch_dtype)."""
    config = dict(config)
    rope = config.pop("rope_parameters", None) or {}
    if rope:
        config["rope_theta"] = rope.get("rope_theta", config.get("rope_theta", 10000.0))
        if rope.get("rope_type", "default") != "default":
            config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    config.setdefault("torch_dtype", config.get("dtype", "float32"))
    return config


def backbone_reference(model) -> str:
    """What run_config's model_name_or_path says: a hub id, or the backbone's local Hugging Face folder."""
    from components.backbone import resolve_folder

    spec = model.backbone_info.spec
    if spec.source == "hub":
        return spec.name
    if spec.source == "random":
        raise OfficialFormatError("the model's backbone is built in code (source: random); the official package needs a "
                                  "Hugging Face folder or hub id: pass backbone_path")
    return str(resolve_folder(spec)[0].resolve())


def save_official(model, out: str | os.PathLike, backbone_path: str | None = None) -> Path:
    """Write `model` in the official layout, so that LLM2VecGenModel.from_pretrained(out) loads it and encodes the same.

    backbone_path: run_config's model_name_or_path (default: the model's hub id or local backbone folder; a relative
    path is read by the official package against its working directory and by us against `out` first)."""
    from transformers import AutoTokenizer

    out = Path(out)
    (out / "encoder").mkdir(parents=True, exist_ok=True)
    config = model.config
    names = config.special_tokens
    # The tokenizer: the backbone's, with the K tokens as its only additional special tokens (what the official
    # encode appends to every text), padding on the left (its batches take the last C positions).
    tokenizer = AutoTokenizer.from_pretrained(model.backbone_info.spec.name) if model.backbone_info.spec.source == "hub" \
        else _fresh_tokenizer(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    tokenizer.add_special_tokens({"additional_special_tokens": names}, replace_extra_special_tokens=True)
    tokenizer.save_pretrained(out)
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    for key in ("extra_special_tokens", "is_local", "local_files_only"):  # transformers 5 only
        tokenizer_config.pop(key, None)
    tokenizer_config.update(additional_special_tokens=names, tokenizer_class="PreTrainedTokenizerFast", padding_side="left")
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    indices = tokenizer.convert_tokens_to_ids(names)

    rows = model.special_embeddings.detach().float().cpu().contiguous()
    # Only the rows: peft would also save the resized embedding matrix, which the official load does not need (the
    # rows at token_indices replace whatever resize_token_embeddings put there).
    save_file({f"base_model.model.embed_tokens.{_DELTA}": rows}, out / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    reference = backbone_path or backbone_reference(model)
    (out / ADAPTER_CONFIG).write_text(json.dumps({
        "auto_mapping": {"base_model_class": type(model.backbone.base_model).__name__,
                         "parent_library": type(model.backbone.base_model).__module__},
        "base_model_name_or_path": reference, "inference_mode": True, "init_weights": True,
        "peft_type": "TRAINABLE_TOKENS", "peft_version": "0.18.0", "revision": None, "target_modules": "embed_tokens",
        "task_type": None, "token_indices": indices,
    }, indent=2))
    encoder_config = _transformers4_config(model.backbone.config.to_dict())
    encoder_config.update(vocab_size=len(tokenizer), num_special_tokens=len(names), special_tokens_ids=indices,
                          architectures=[type(model.backbone.base_model).__name__])
    (out / ENCODER_CONFIG).write_text(json.dumps(encoder_config, indent=2, default=str))

    for name, head in (("reconstruction_mlp", model.reconstruction), ("alignment_mlp", model.alignment)):
        torch.save({
            "state_dict": {"projection.weight": head.weight.detach().float().cpu().clone(),
                           "projection.bias": head.bias.detach().float().cpu().clone()},
            "config": {"input_dim": head.in_features, "output_dim": head.out_features, "dtype": "torch.float32",
                       "size": 1, "pooling_mode": "linear"},
        }, out / name)
    (out / ENCODER_DECODER_CONFIG).write_text(json.dumps(
        {"encoding_mode": f"last_{config.compression_tokens}_tokens", "save_decoder": False}, indent=2))
    (out / RUN_CONFIG).write_text(
        f"model_name_or_path: {json.dumps(reference)}\n"
        f"torch_dtype: {config.backbone.dtype}\n"
        f"special_tokens: {json.dumps(names)}\n"
        f"encoding_mode: last_{config.compression_tokens}_tokens\n"
        f"max_input_length: {config.max_query_tokens + len(names)}\n"
        f"special_token_config_name: total_{len(names)}\n"
        + "".join(f"{key}: {json.dumps(value)}\n" for key, value in teacher_paths(config.teacher).items()) +
        "# written by llm2vec-gen-ray (python -m workflows.export ... --format official)\n"
    )
    return out


def teacher_paths(teacher: str) -> dict[str, str]:
    """run_config's teacher keys for our config.teacher: an llm2vec teacher is a model and its adapter, as theirs."""
    if teacher.startswith("llm2vec:"):
        names = teacher.removeprefix("llm2vec:").split(",")
        return {"pretrained_teacher_path": names[0], **({"pretrained_teacher_path_2": names[1]} if len(names) > 1 else {})}
    return {"pretrained_teacher_path": teacher} if teacher else {}


def _fresh_tokenizer(model):
    """The backbone's tokenizer as saved with it, without the tokens our model added to the loaded copy."""
    from transformers import AutoTokenizer

    from components.backbone import build_byte_tokenizer, resolve_folder

    spec = model.backbone_info.spec
    if spec.source == "random":
        tokenizer = build_byte_tokenizer()
    else:
        tokenizer = AutoTokenizer.from_pretrained(resolve_folder(spec)[0])
    return tokenizer
