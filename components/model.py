"""LLM2Vec-Gen: a frozen causal LLM turned into a text embedder by K trainable special tokens.

Notation (paper, arXiv 2603.10913), with B texts in a batch, H the LLM's hidden size, D the teacher's size:

    x          the query tokens; y = (y_1 .. y_R) the frozen LLM's own response to x
    t_1..t_T   thought tokens, c_1..c_C compression tokens: K = T + C new rows, the only trained embeddings
    h          = LLM([x ; t ; c])[last C positions]             (B, C, H)  last hidden states
    z          = W_r h + b_r                                     (B, C, H)  back in the LLM's input space
    e          = 1/C * sum_i (W_a z_i + b_a)                     (B, D)     the embedding
    L_recon    = -1/R * sum_j log p_LLM(y_j | z, y_<j)                      the same frozen LLM reads z
    L_align    = MSE(e, teacher(y))
    L          = w_recon * L_recon + w_align * L_align

Every backbone weight stays bit-for-bit unchanged: the special rows live in their own (K, H) parameter and
are spliced in after the query's embeddings, so the vocabulary matrix is never resized nor optimised. One
backbone serves both the encoding pass and the reconstruction pass. Because z lives in the input space,
`decode` lets the LLM generate text from it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from safetensors.torch import load_file, save_file
from torch import nn

from components.backbone import Backbone, BackboneSpec, load_backbone
from components.checkpointing import checkpointed_layers
from components.spec import LossSpec, Spec

CONFIG_FILE = "llm2vec_gen.json"
WEIGHTS_FILE = "trainable.safetensors"


class ModelConfig(BaseModel):
    """Everything needed to rebuild the model next to its backbone; saved as llm2vec_gen.json."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: Literal[1] = 1
    backbone: BackboneSpec
    backbone_fingerprint: str
    thought_tokens: int
    compression_tokens: int
    hidden_size: int
    embedding_dim: int
    reconstruction_init: Literal["random", "identity", "moments"] = "random"
    max_query_tokens: int = 512
    prompts: dict[str, str] = {}
    teacher: str = ""  # provenance only: what the alignment targets came from
    seed: int = 0
    # Set for a model read from the official layout (components/official_format.py): its own token names, and the
    # ids its greedy decoding stops at (config.eos_token_id plus the family's end-of-text). Empty: ours, and the
    # tokenizer's EOS.
    special_token_names: list[str] = []
    stop_token_ids: list[int] = []

    @property
    def special_tokens(self) -> list[str]:
        if self.special_token_names:
            return list(self.special_token_names)
        thoughts = [f"<|llm2vec_thought_{i}|>" for i in range(self.thought_tokens)]
        compressions = [f"<|llm2vec_compress_{i}|>" for i in range(self.compression_tokens)]
        return thoughts + compressions


@dataclass
class TrainingBatch:
    query_ids: torch.Tensor  # (B, Lq) left-padded
    query_mask: torch.Tensor  # (B, Lq)
    response_ids: torch.Tensor  # (B, R) right-padded, ends with EOS unless truncated
    response_mask: torch.Tensor  # (B, R)
    teacher: torch.Tensor  # (B, D) alignment targets


@dataclass
class Losses:
    total: torch.Tensor
    reconstruction: torch.Tensor
    alignment: torch.Tensor
    embedding: torch.Tensor  # (B, D), kept for in-batch diagnostics


class LLM2VecGen(nn.Module):
    def __init__(self, backbone: Backbone, config: ModelConfig):
        super().__init__()
        if backbone.model.config.hidden_size != config.hidden_size:
            raise ValueError(f"backbone hidden size {backbone.model.config.hidden_size} != saved {config.hidden_size}")
        self.config = config
        # The frozen backbone is deliberately not a registered submodule: parameters(), state_dict(), the
        # optimizer, DeepSpeed's broadcasts and checkpoints then see only what is trained. _apply moves it along.
        object.__setattr__(self, "backbone", backbone.model)  # shared by the encoding and reconstruction passes
        self.backbone_info = backbone
        self.cache_query_prefix = True  # see compression_states; False gives the plain single pass
        self.gradient_checkpointing = False  # training.gradient_checkpointing: components/checkpointing.py
        self.tokenizer = backbone.tokenizer
        self.tokenizer.add_special_tokens(
            {"additional_special_tokens": config.special_tokens}, replace_extra_special_tokens=False
        )
        hidden, num_special = config.hidden_size, config.thought_tokens + config.compression_tokens
        vocabulary = self.backbone.get_input_embeddings().weight.detach().float()  # (V, H)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            # New rows start as plausible tokens: the vocabulary's mean plus noise of its per-dimension spread.
            start = vocabulary.mean(0) + vocabulary.std(0) * torch.randn(num_special, hidden)
            self.special_embeddings = nn.Parameter(start)  # (K, H)
            self.reconstruction = nn.Linear(hidden, hidden)  # W_r: hidden state -> input embedding space
            self.alignment = nn.Linear(hidden, config.embedding_dim)  # W_a: input space -> teacher space
        if config.reconstruction_init in ("identity", "moments"):  # moments: refined by fit_heads from data
            with torch.no_grad():
                self.reconstruction.weight.copy_(torch.eye(hidden))
                self.reconstruction.bias.zero_()

    # ------------------------------------------------------------------------------------------ building

    @classmethod
    def from_spec(cls, spec: Spec, embedding_dim: int, backbone: Backbone | None = None) -> LLM2VecGen:
        backbone = backbone or load_backbone(spec.backbone)
        teacher = spec.teacher.name or f"{spec.teacher.package}/{spec.teacher.path_in_package}".rstrip("/")
        if spec.teacher.kind == "llm2vec":  # "llm2vec:<model>,<adapter>,...": enough to load it again
            teacher = ",".join([spec.teacher.name or "", *spec.teacher.adapters])
        config = ModelConfig(
            backbone=spec.backbone,
            backbone_fingerprint=backbone.fingerprint,
            thought_tokens=spec.tokens.thought,
            compression_tokens=spec.tokens.compression,
            hidden_size=backbone.model.config.hidden_size,
            embedding_dim=embedding_dim,
            reconstruction_init=spec.model.reconstruction_init,
            max_query_tokens=spec.model.max_query_tokens,
            prompts=spec.model.prompt_mapping,
            teacher=f"{spec.teacher.kind}:{teacher}" if spec.teacher.kind != "backbone_mean_pool" else "backbone_mean_pool",
            seed=spec.training.seed,
        )
        return cls(backbone, config)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())  # the backbone is not registered: see __init__

    def _apply(self, fn, recurse=True):
        self.backbone._apply(fn, recurse)
        return super()._apply(fn, recurse)

    @property
    def device(self) -> torch.device:
        return self.special_embeddings.device

    @property
    def _dtype(self) -> torch.dtype:
        return self.backbone.get_input_embeddings().weight.dtype

    # ------------------------------------------------------------------------------------------ encoding

    def tokenize_queries(self, texts: Sequence[str], prompt: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ids (B, Lq) and mask of `prompt + text`; the K special tokens are added as embeddings."""
        # split_special_tokens: a text that spells a special token ("<|llm2vec_compress_0|>", "<|im_end|>") is
        # read as plain text, never as the token itself.
        rows = self.tokenizer(
            [prompt + text for text in texts],
            truncation=True,
            max_length=self.config.max_query_tokens,
            split_special_tokens=True,
        )["input_ids"]
        return pad_rows(rows, self.tokenizer.pad_token_id, side="left", device=self.device)

    def compression_states(self, query_ids: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
        """h: the last hidden states at the C compression positions of [x ; t ; c]."""
        batch, num_special = query_ids.shape[0], self.special_embeddings.shape[0]
        tokens = self.backbone.get_input_embeddings()(query_ids)  # (B, Lq, H)
        special = self.special_embeddings.to(self._dtype).expand(batch, -1, -1)  # (B, K, H)
        mask = torch.cat([query_mask, query_mask.new_ones(batch, num_special)], dim=1)  # (B, Lq + K)
        # Positions count real tokens only, so left padding does not shift them: a text's embedding does not
        # depend on what else is in its batch.
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        if self.cache_query_prefix and torch.is_grad_enabled():
            # The query comes before every trainable token in a causal model, so nothing trainable reaches it:
            # run it once without gradient and run only the K special tokens with gradient on its keys/values.
            with torch.no_grad():
                prefix = self.backbone.base_model(
                    inputs_embeds=tokens, attention_mask=query_mask, position_ids=positions[:, :-num_special], use_cache=True
                )
            hidden = self.backbone.base_model(
                inputs_embeds=special,
                attention_mask=mask,
                position_ids=positions[:, -num_special:],
                cache=prefix.cache,
                use_cache=True,
            ).last_hidden_state  # (B, K, H)
        else:
            inputs = torch.cat([tokens, special], dim=1)  # (B, Lq + K, H)
            with checkpointed_layers(self.backbone, self.gradient_checkpointing):
                hidden = self.backbone.base_model(
                    inputs_embeds=inputs, attention_mask=mask, position_ids=positions, use_cache=False
                ).last_hidden_state
        return upcast(hidden[:, -self.config.compression_tokens :])  # (B, C, H)

    def project(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h (B, C, H) -> z (B, C, H) in input space, and the embedding e (B, D)."""
        # h comes in float32; the projections compute in their own dtype, which DeepSpeed's bf16 mode makes bfloat16.
        z = self.reconstruction(states.to(self.reconstruction.weight.dtype))
        embedding = self.alignment(z).mean(dim=1)
        return z, embedding

    def compress(self, query_ids: torch.Tensor, query_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.project(self.compression_states(query_ids, query_mask))

    @torch.no_grad()
    def fit_heads(self, queries: Sequence[str], targets: torch.Tensor, reconstruction: str, alignment: str,
                  ridge: float, batch_size: int = 16) -> None:
        """Data-dependent starts of the two projections (see ModelSpec): from the compression states of `queries`
        under the current special tokens, and the teacher `targets` (N, D) of their answers."""
        if reconstruction != "moments" and alignment != "ridge":
            return
        states = torch.cat([
            self.compression_states(*self.tokenize_queries(queries[start : start + batch_size]))
            for start in range(0, len(queries), batch_size)
        ])  # (N, C, H)
        if reconstruction == "moments":
            vocabulary = self.backbone.get_input_embeddings().weight.detach().float()
            scale, shift = moment_matching(states.reshape(-1, states.shape[-1]), vocabulary)
            self.reconstruction.weight.copy_(torch.diag(scale))
            self.reconstruction.bias.copy_(shift)
        if alignment == "ridge":
            z_mean = self.reconstruction(states.to(self.reconstruction.weight.dtype)).float().mean(dim=1)  # (N, H): the embedding is linear in it
            weight, bias = ridge_readout(z_mean, targets.float().to(z_mean.device), ridge)
            self.alignment.weight.copy_(weight)
            self.alignment.bias.copy_(bias)

    # ------------------------------------------------------------------------------------------- losses

    def reconstruction_loss(self, z: torch.Tensor, response_ids: torch.Tensor, response_mask: torch.Tensor):
        """Mean cross-entropy of the response tokens given [z ; y], for the whole batch in one pass."""
        batch, num_compression = z.shape[0], z.shape[1]
        responses = self.backbone.get_input_embeddings()(response_ids)  # (B, R, H)
        inputs = torch.cat([z.to(self._dtype), responses], dim=1)  # (B, C + R, H)
        mask = torch.cat([response_mask.new_ones(batch, num_compression), response_mask], dim=1)
        with checkpointed_layers(self.backbone, self.gradient_checkpointing):
            hidden = self.backbone.base_model(inputs_embeds=inputs, attention_mask=mask, use_cache=False).last_hidden_state
        # Position C-1+j reads z and y_<j, and predicts y_j. Right padding keeps positions exact.
        predictors = hidden[:, num_compression - 1 : -1]  # (B, R, H)
        real = response_mask.bool()
        logits = upcast(self.backbone.get_output_embeddings()(predictors[real]))  # (N, V), real tokens only
        return F.cross_entropy(logits, response_ids[real])

    @staticmethod
    def alignment_loss(embedding: torch.Tensor, teacher: torch.Tensor, kind: str = "mse") -> torch.Tensor:
        # In float32 at least whatever the embedding's dtype: bf16 targets would round every teacher value to 8 bits,
        # and the squared error of centred targets (~1e-3 per dimension) would be summed in bf16.
        embedding = upcast(embedding)
        teacher = teacher.to(embedding.device, embedding.dtype)
        if kind == "cosine":
            return (1 - F.cosine_similarity(embedding, teacher, dim=-1)).mean()
        return F.mse_loss(embedding, teacher)

    def forward(self, batch: TrainingBatch, loss: LossSpec | None = None) -> Losses:
        """The training objective, weighted as in `loss` (default: the paper's, 1 * recon + 1 * MSE)."""
        loss = loss or LossSpec()
        z, embedding = self.compress(batch.query_ids, batch.query_mask)
        # A zero weight skips the pass entirely: the reconstruction pass is most of a step's compute.
        reconstruction = (
            self.reconstruction_loss(z, batch.response_ids, batch.response_mask) if loss.reconstruction else z.new_zeros(())
        )
        alignment = self.alignment_loss(embedding, batch.teacher, loss.alignment_kind)
        total = loss.reconstruction * reconstruction + loss.alignment * alignment
        return Losses(total, reconstruction.detach(), alignment.detach(), embedding.detach())

    def token_lengths(self, queries: Sequence[str], responses: Sequence[str], max_response_tokens: int) -> list[int]:
        """Tokens per training row as collate makes them (query + special tokens + capped response + EOS).

        Batches are grouped by these, not by characters: repetitive answers and numbers tokenise very unevenly.
        """
        query_rows = self.tokenizer(list(queries), truncation=True, max_length=self.config.max_query_tokens, split_special_tokens=True)
        response_rows = self.tokenizer(list(responses), add_special_tokens=False, split_special_tokens=True)
        return [
            len(q) + min(len(r) + 1, max_response_tokens)
            for q, r in zip(query_rows["input_ids"], response_rows["input_ids"], strict=True)
        ]

    def collate(
        self, queries: Sequence[str], responses: Sequence[str], teacher: np.ndarray | torch.Tensor, max_response_tokens: int
    ) -> TrainingBatch:
        """Tokenised tensors for a batch of (query, response, teacher vector) rows."""
        query_ids, query_mask = self.tokenize_queries(queries)
        eos = self.tokenizer.eos_token_id
        rows = self.tokenizer(list(responses), add_special_tokens=False, split_special_tokens=True)["input_ids"]
        rows = [(row + [eos])[:max_response_tokens] for row in rows]
        response_ids, response_mask = pad_rows(rows, self.tokenizer.pad_token_id, side="right", device=self.device)
        teacher = torch.as_tensor(np.asarray(teacher), dtype=torch.float32, device=self.device)
        return TrainingBatch(query_ids, query_mask, response_ids, response_mask, teacher)

    # -------------------------------------------------------------------------------------- inference API

    @torch.inference_mode()
    def encode(
        self,
        texts: str | Sequence[str],
        batch_size: int = 32,
        normalize: bool = False,
        show_progress_bar: bool | None = None,
        prompt_name: str | None = None,
        prompt: str | None = None,
        convert_to_tensor: bool = False,
    ) -> np.ndarray | torch.Tensor:
        """Embeddings (N, D) of `texts`, like sentence-transformers' `encode` (one text gives (D,))."""
        single = isinstance(texts, str)
        texts = check_texts([texts] if single else texts)
        prefix = self._prompt(prompt_name, prompt)
        # Longest first, so that each batch pads little; results are put back in input order.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        chunks = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
        out = torch.empty(len(texts), self.config.embedding_dim)
        for chunk in _progress(chunks, show_progress_bar, "encode"):
            _, embedding = self.compress(*self.tokenize_queries([texts[i] for i in chunk], prefix))
            out[chunk] = embedding.float().cpu()
        if normalize:
            out = F.normalize(out, dim=-1)
        out = out[0] if single else out
        return out if convert_to_tensor else out.numpy()

    @torch.inference_mode()
    def decode(
        self, inputs: str | Sequence[str] | torch.Tensor, max_new_tokens: int = 64, prompt_name: str | None = None
    ) -> str | list[str]:
        """What the LLM writes when fed z: texts are compressed first; a tensor is taken as z, (C, H) or (B, C, H)."""
        single = isinstance(inputs, str) or (isinstance(inputs, torch.Tensor) and inputs.dim() == 2)
        if isinstance(inputs, torch.Tensor):
            z = inputs.unsqueeze(0) if inputs.dim() == 2 else inputs
            expected = (self.config.compression_tokens, self.config.hidden_size)
            if z.dim() != 3 or tuple(z.shape[1:]) != expected:
                raise ValueError(f"decode: z must have shape (C, H) or (B, C, H) with (C, H) = {expected}, got {tuple(inputs.shape)}")
        else:
            texts = check_texts([inputs] if single else inputs)
            z, _ = self.compress(*self.tokenize_queries(texts, self._prompt(prompt_name, None)))
        texts = self.tokenizer.batch_decode(self._greedy(z, max_new_tokens), skip_special_tokens=True)
        return texts[0] if single else texts

    @torch.inference_mode()
    def generate_ids(self, texts: Sequence[str], max_new_tokens: int = 64, prompt_name: str | None = None) -> list[list[int]]:
        """The token ids `decode` writes for each text, up to and including the stop token (one list per text)."""
        texts = check_texts(texts)
        z, _ = self.compress(*self.tokenize_queries(texts, self._prompt(prompt_name, None)))
        stop = set(self._stop_ids())
        rows = []
        for row in self._greedy(z, max_new_tokens).tolist():
            end = next((index + 1 for index, token in enumerate(row) if token in stop), len(row))
            rows.append(row[:end])
        return rows

    def _stop_ids(self) -> list[int]:
        return list(self.config.stop_token_ids) or [self.tokenizer.eos_token_id]

    def _greedy(self, z: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """(B, new) greedy ids from z (B, C, H) fed as the only context; finished rows are padded."""
        z = z.to(self.device, self._dtype)
        return self.backbone.generate(
            inputs_embeds=z,
            attention_mask=torch.ones(z.shape[:2], dtype=torch.long, device=self.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self._stop_ids(),
        )

    def _prompt(self, prompt_name: str | None, prompt: str | None) -> str:
        if prompt is not None:
            return prompt
        if prompt_name is None:
            return ""
        if prompt_name not in self.config.prompts:
            raise KeyError(f"prompt_name '{prompt_name}' is not one of {sorted(self.config.prompts)}")
        return self.config.prompts[prompt_name]

    # ------------------------------------------------------------------------------------------ storage

    def save(self, path: str | Path) -> Path:
        """A small folder: the trained rows and projections (safetensors) and llm2vec_gen.json. No pickle."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {name: value.detach().cpu().contiguous() for name, value in self.state_dict().items()}
        save_file(tensors, path / WEIGHTS_FILE, metadata={"format": "llm2vec-gen-ray"})
        (path / CONFIG_FILE).write_text(
            json.dumps({**self.config.model_dump(mode="json"), "special_tokens": self.config.special_tokens}, indent=2)
        )
        return path

    @classmethod
    def load(cls, path: str | Path, backbone: Backbone | None = None, dtype: str | None = None) -> LLM2VecGen:
        """A saved model (our folder, an official llm2vec-gen folder or hub id); `dtype` loads its backbone in another precision than it was trained in (e.g. bfloat16 to
        serve on a GPU what was trained in float32 on a CPU): same weights, so the fingerprint still matches."""
        from components import official_format

        if official_format.is_official(path) or official_format.looks_like_hub_id(str(path)):
            return official_format.load_official(path, backbone=backbone, dtype=dtype)  # McGill-NLP's layout or hub id
        path = Path(path)
        if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"{path}: not an LLM2Vec-Gen model folder (needs {CONFIG_FILE} and {WEIGHTS_FILE}, "
                                    "or the official layout's run_config.yml and encoder/)")
        saved = json.loads((path / CONFIG_FILE).read_text())
        saved.pop("special_tokens", None)  # derived from the counts; written for readers of the folder
        config = ModelConfig.model_validate(saved)
        if backbone is None:
            spec = config.backbone if dtype is None else config.backbone.model_copy(update={"dtype": dtype})
            backbone = load_backbone(spec)
        if backbone.fingerprint != config.backbone_fingerprint:
            raise ValueError(
                f"{path}: the backbone's weights differ from those the model was trained on "
                f"(fingerprint {backbone.fingerprint[:16]} != {config.backbone_fingerprint[:16]})"
            )
        model = cls(backbone, config)
        try:
            model.load_state_dict(load_file(path / WEIGHTS_FILE))
        except RuntimeError as err:
            raise ValueError(f"{path}/{WEIGHTS_FILE}: does not match {CONFIG_FILE}: {err}") from None
        return model


# ----------------------------------------------------------------------------------------------- helpers


def upcast(tensor: torch.Tensor) -> torch.Tensor:
    """float32 for bf16/fp16/fp32 tensors; float64 stays float64 (the float64 check against the official step,
    benchmarks/training.py, needs every op of the step in float64)."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def moment_matching(states: torch.Tensor, embeddings: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension (scale, shift) with scale * states + shift having the mean and std of `embeddings`, per dim.

    states: (N, H) hidden states; embeddings: (V, H) the vocabulary's input embeddings.
    """
    scale = embeddings.std(0) / (states.std(0) + eps)
    return scale, embeddings.mean(0) - scale * states.mean(0)


def ridge_readout(features: torch.Tensor, targets: torch.Tensor, ridge: float, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(W (D, H), b (D,)) minimising |W x + b - t|^2 + ridge * n * |W'|^2 over the rows, where W' acts on features
    standardised per dimension: one penalty then suits every dimension, however anisotropic the features are."""
    mean, std = features.mean(0), features.std(0) + eps
    standard = ((features - mean) / std).double()  # (N, H)
    centred = (targets - targets.mean(0)).double()  # (N, D)
    gram = standard.T @ standard + ridge * len(features) * torch.eye(features.shape[1], dtype=torch.float64, device=features.device)
    solution = torch.linalg.solve(gram, standard.T @ centred)  # (H, D), on standardised features
    weight = (solution / std.double()[:, None]).T.float()  # (D, H), on raw features
    return weight, (targets.mean(0) - weight @ mean).float()


def check_texts(texts: Sequence[str]) -> list[str]:
    """Inputs must be non-empty strings; the error names the first bad index."""
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a string or a list of strings, got {type(texts).__name__}")
    if not texts:
        raise ValueError("texts is empty")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{index}] must be a string, got {type(text).__name__}")
        if not text.strip():
            raise ValueError(f"texts[{index}] is empty")
    return list(texts)


def pad_rows(rows: list[list[int]], pad_id: int, side: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id rows -> (ids, mask), each (B, longest), padded on `side` ("left" or "right")."""
    length = max(1, max(len(row) for row in rows))
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for index, row in enumerate(rows):
        span = slice(length - len(row), length) if side == "left" else slice(0, len(row))
        ids[index, span] = torch.tensor(row, dtype=torch.long)
        mask[index, span] = 1
    return ids.to(device), mask.to(device)


def _progress(items, show: bool | None, description: str):
    if not show:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=description)
