"""The teacher: an unsupervised embedder whose vectors of the responses are the alignment targets.

Kinds (spec.teacher.kind):
    sentence_transformers  a SentenceTransformer folder, hub id, or one shipped inside a Python package
                           (`package` + `path_in_package`, found without importing the package)
    hf_mean_pool           any Hugging Face encoder (AutoModel): masked mean of its last hidden states
    backbone_mean_pool     the frozen backbone itself: masked mean of its last hidden states
    llm2vec                a decoder with bidirectional attention and LoRA adapters (MNTP merged, then e.g.
                           SimCSE): mean over the text's own tokens (components/llm2vec.py)
With normalize, vectors are L2-normalised. They are computed once, in the teacher stage, never during training.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from components.backbone import Backbone, folder_fingerprint, load_backbone
from components.generation import backbone_identity, length_batches
from components.spec import BackboneSpec, TeacherSpec


class TeacherError(ValueError):
    """The teacher named by the spec cannot be found; the message names the key."""


class Teacher(Protocol):
    dimension: int

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(N, D) float32 vectors of `texts`, in order."""
        ...


# ------------------------------------------------------------------------------------------------- locating


def teacher_location(teacher: TeacherSpec) -> str:
    """A local folder (from `package` or an existing path in `name`) or, failing that, the hub id in `name`."""
    if teacher.kind == "backbone_mean_pool":
        return "backbone"
    if teacher.package is not None:
        try:
            found = importlib.util.find_spec(teacher.package)
        except (ImportError, ValueError):
            found = None
        if found is None or not found.submodule_search_locations:
            raise TeacherError(f"teacher.package: Python package '{teacher.package}' is not installed (pip install it)")
        folder = Path(next(iter(found.submodule_search_locations))) / teacher.path_in_package
        if not folder.is_dir():
            raise TeacherError(f"teacher.path_in_package: no folder '{teacher.path_in_package}' in package "
                               f"'{teacher.package}' ({folder})")
        return str(folder)
    if teacher.name is None:
        raise TeacherError(f"teacher.name: kind {teacher.kind} needs a name (a teacher.train section is resolved to "
                           "its trained folder by the teacher stage of workflows.run)")
    local = Path(teacher.name).expanduser()
    return str(local) if local.exists() else teacher.name


def teacher_fingerprint(teacher: TeacherSpec, backbone: BackboneSpec) -> str:
    """Identifies the teacher's weights (for the cache key of the teacher stage)."""
    if teacher.kind == "backbone_mean_pool":
        return f"backbone:{backbone_identity(backbone).fingerprint}"
    if teacher.kind == "llm2vec":
        parts = [teacher.name or "", *teacher.adapters]
        return "+".join(_location_fingerprint(Path(part).expanduser(), part) for part in parts)
    location = Path(teacher_location(teacher))
    return folder_fingerprint(location) if (location / "config.json").is_file() else f"hub:{teacher.name}"


def _location_fingerprint(location: Path, name: str | None) -> str:
    """A folder's weights (a model's or an adapter's, or any of ours holding them), else the hub id it names."""
    if location.is_dir():
        weights = sorted(location.rglob("*.safetensors")) + sorted(location.rglob("*.json"))
        if (location / "config.json").is_file() and not (location / "adapter_config.json").is_file():
            return folder_fingerprint(location)
        if weights:
            digest = hashlib.sha256()
            for path in weights:
                digest.update(f"{path.relative_to(location)}:{path.stat().st_size}".encode())
                digest.update(path.read_bytes() if path.suffix == ".json" else _ends(path))
            return digest.hexdigest()
    return f"hub:{name}"


def _ends(path: Path) -> bytes:
    """The first and last MiB of a weight file: cheap, and any retraining changes them."""
    with open(path, "rb") as handle:
        head = handle.read(1 << 20)
        handle.seek(max(0, path.stat().st_size - (1 << 20)))
        return head + handle.read(1 << 20)


def teacher_dimension(teacher: TeacherSpec, backbone: Backbone | BackboneSpec | None = None) -> int:
    """The size D of the teacher's vectors, known before any response is embedded (to build the model)."""
    if teacher.kind == "backbone_mean_pool" or (teacher.kind == "llm2vec" and teacher.train and not teacher.name):
        # (an LLM2Vec teacher trained from the backbone has the backbone's hidden size)
        if backbone is None:
            raise TeacherError("teacher.kind: backbone_mean_pool needs the backbone (or its spec) to know its size")
        if isinstance(backbone, Backbone):
            return backbone.model.config.hidden_size
        return backbone_identity(backbone).hidden_size
    if teacher.kind == "hf_mean_pool":
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(teacher_location(teacher)).hidden_size
    if teacher.kind == "llm2vec":
        from transformers import AutoConfig

        from components.llm2vec import locate

        teacher_location(teacher)  # the name must be set
        return AutoConfig.from_pretrained(locate(teacher.name, teacher.adapters).base).hidden_size
    from sentence_transformers import SentenceTransformer

    # Modules after the encoder (Dense layers) may change the size; loading the small model is the sure way.
    return SentenceTransformer(teacher_location(teacher), device="cpu").get_embedding_dimension()


# -------------------------------------------------------------------------------------------------- teachers


def load_teacher(teacher: TeacherSpec, backbone: BackboneSpec, device: str = "cpu") -> Teacher:
    if teacher.kind == "sentence_transformers":
        return SentenceTransformerTeacher(teacher, device)
    if teacher.kind == "hf_mean_pool":
        from transformers import AutoModel, AutoTokenizer

        location = teacher_location(teacher)
        model = AutoModel.from_pretrained(location).to(device).eval()
        return MeanPoolTeacher(model, AutoTokenizer.from_pretrained(location), teacher)
    if teacher.kind == "llm2vec":
        return LLM2VecTeacher(teacher, device)
    loaded = load_backbone(backbone)
    return MeanPoolTeacher(loaded.model.base_model.to(device), loaded.tokenizer, teacher)


class LLM2VecTeacher:
    """Bidirectional decoder + adapters (the last one unmerged unless merge_adapters); e = the mean of the last hidden
    states over every attended token (pooling mean) or the text's own tokens (mean_text)."""

    def __init__(self, teacher: TeacherSpec, device: str):
        from components.llm2vec import load_llm2vec

        teacher_location(teacher)  # the name must be set
        self.spec = teacher
        self.encoder, self.tokenizer = load_llm2vec(teacher.name, teacher.adapters, teacher.dtype, device=device,
                                                    merge_last=teacher.merge_adapters)
        self.dimension = self.encoder.config.hidden_size

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        from components.llm2vec import embed_texts

        return embed_texts(self.encoder, self.tokenizer, list(texts), self.spec.batch_size, self.spec.max_tokens,
                           normalize=self.spec.normalize, pooling=self.spec.pooling)


class SentenceTransformerTeacher:
    def __init__(self, teacher: TeacherSpec, device: str):
        from sentence_transformers import SentenceTransformer

        self.spec = teacher
        self.model = SentenceTransformer(teacher_location(teacher), device=device)
        self.dimension = self.model.get_embedding_dimension()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        vectors = self.model.encode(
            list(texts),
            batch_size=self.spec.batch_size,
            normalize_embeddings=self.spec.normalize,
            convert_to_numpy=True,
        )
        return vectors.astype(np.float32, copy=False)


class MeanPoolTeacher:
    """e = sum_t m_t h_t / sum_t m_t over the last hidden states h (T, H) of a text and its mask m (T,)."""

    def __init__(self, encoder: torch.nn.Module, tokenizer, teacher: TeacherSpec):
        self.encoder = encoder.eval()
        self.tokenizer = tokenizer
        self.spec = teacher
        self.dimension = encoder.config.hidden_size
        self.device = next(encoder.parameters()).device

    @torch.inference_mode()
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        # Similar lengths per batch, so little compute goes to padding; results go back in input order.
        for batch in length_batches([len(text) for text in texts], self.spec.batch_size):
            encoded = self.tokenizer(
                [texts[i] for i in batch], padding=True, truncation=True, max_length=self.spec.max_tokens,
                return_tensors="pt",
            ).to(self.device)
            if encoded.input_ids.shape[1] == 0:  # only empty texts (a tokenizer without special tokens)
                continue
            hidden = self.encoder(input_ids=encoded.input_ids, attention_mask=encoded.attention_mask).last_hidden_state
            mask = encoded.attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            # An empty text has no tokens: its vector stays zero rather than 0/0.
            vectors = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, H)
            if self.spec.normalize:
                vectors = F.normalize(vectors.float(), dim=-1)
            out[batch] = vectors.float().cpu().numpy()
        return out


# ------------------------------------------------------------------------------------------------ the actor


class TeacherEmbedder:
    """Ray Data worker: loads the teacher once per actor, then adds a `teacher` vector to every row of a shard."""

    def __init__(self, teacher: TeacherSpec, backbone: BackboneSpec):
        self.teacher = load_teacher(teacher, backbone, device="cuda" if torch.cuda.is_available() else "cpu")

    def __call__(self, shard: pa.Table) -> pa.Table:
        vectors = self.teacher.embed(shard.column("response").to_pylist())  # (N, D)
        offsets = pa.array(np.arange(0, vectors.size + 1, vectors.shape[1], dtype=np.int32))
        column = pa.ListArray.from_arrays(offsets, pa.array(vectors.reshape(-1), pa.float32()))
        return shard.append_column("teacher", column)
