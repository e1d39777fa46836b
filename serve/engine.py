"""The model behind the HTTP API, without Ray: tokenising under the limits, batched encoding, decoding.

Inputs are tokenised once, when a request arrives, so that limits and usage are exact and a collected batch can
be split by tokens before it runs. Rows are padded and compressed exactly as `LLM2VecGen.encode` does it (left
padding, positions counting real tokens), so a served vector equals `model.encode` of the same text, whatever
else shares its batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from components.model import LLM2VecGen, pad_rows  # encode's own padding, so served vectors equal encode's
from components.spec import ServingSpec
from serve.protocol import ApiError, InstructionFields


@dataclass(frozen=True)
class Encoded:
    """One input's outputs: the raw (unnormalised) embedding e (D,) and its compression states z (C, H)."""

    embedding: np.ndarray
    states: np.ndarray


# A CPU forward pass's fixed cost in tokens (the default of serving.pass_cost_tokens there): about what the
# padding of a few rows costs.
CPU_PASS_COST_TOKENS = 64

# Called after each forward pass with (rows, padded tokens, seconds), for metrics.
PassObserver = Callable[[int, int, float], None]


def split_by_token_budget(
    lengths: Sequence[int], max_batch_tokens: int, extra_tokens: int = 0, pass_cost_tokens: int = 0
) -> list[list[int]]:
    """Indices grouped into forward passes, each padded to at most max_batch_tokens: rows x (longest + extra).

    Rows are taken longest first, as `encode` does, and the cut points minimise the padded tokens plus
    pass_cost_tokens per pass (dynamic programming over the sorted lengths; a collected batch is small).
    So a batch of mixed lengths is not all padded to its longest text when the padding would cost more
    than another pass. A row that alone exceeds the budget still runs, alone: the per-input token limit,
    not this split, is what refuses oversized inputs.
    """
    order = sorted(range(len(lengths)), key=lambda index: -lengths[index])
    size = [lengths[index] + extra_tokens for index in order]  # padded width of a pass starting here
    best = [0] + [math.inf] * len(order)  # best[j]: cheapest plan for the first j sorted rows
    cut = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        for start in range(end - 1, -1, -1):
            rows = end - start
            if rows > 1 and rows * size[start] > max_batch_tokens:
                break  # earlier starts are only longer and wider
            cost = best[start] + rows * size[start] + pass_cost_tokens
            if cost <= best[end]:  # on a tie, the longer pass (start only decreases)
                best[end], cut[end] = cost, start
    groups, end = [], len(order)
    while end:
        groups.append(order[cut[end] : end])
        end = cut[end]
    return groups[::-1]


class EmbeddingEngine:
    """One replica's model and limits: checks and tokenises requests, runs forward passes, decodes z."""

    def __init__(self, model: LLM2VecGen, serving: ServingSpec):
        self.model = model
        self.serving = serving
        config = model.config
        # The model truncates beyond its own max_query_tokens, so a larger serving limit would silently cut text.
        self.max_input_tokens = min(serving.max_input_tokens, config.max_query_tokens)
        self.special_tokens = config.thought_tokens + config.compression_tokens
        self.states_shape = (config.compression_tokens, config.hidden_size)
        self.pass_cost_tokens = serving.pass_cost_tokens
        if self.pass_cost_tokens is None:
            self.pass_cost_tokens = serving.max_batch_tokens if model.device.type == "cuda" else CPU_PASS_COST_TOKENS
        # Ids at or past this row are LLM2Vec-Gen's own tokens, spliced in as embeddings and absent from the
        # backbone's vocabulary: a text spelling one out would index past the embedding matrix.
        self._vocabulary_rows = model.backbone.get_input_embeddings().weight.shape[0]

    # ------------------------------------------------------------------------------------ request side

    def prompt(self, fields: InstructionFields) -> str:
        """The text prefixed to every input: free-text `instruction` or one of the model's named prompts."""
        if fields.instruction is not None and fields.prompt_name is not None:
            raise ApiError(400, "give at most one of 'instruction' and 'prompt_name'", param="prompt_name")
        if fields.prompt_name is not None:
            prompts = self.model.config.prompts
            if fields.prompt_name not in prompts:
                known = ", ".join(sorted(prompts)) or "none"
                raise ApiError(
                    400, f"prompt_name '{fields.prompt_name}' is not one of this model's prompts ({known})",
                    param="prompt_name", code="unknown_prompt",
                )
            return prompts[fields.prompt_name]
        return fields.instruction or ""

    def tokenize(self, texts: Sequence[str], prompt: str, truncate: bool) -> list[list[int]]:
        """Token ids of `prompt + text` per input; an input over the limit is a 413 unless `truncate`."""
        limit = self.max_input_tokens
        tokenizer = self.model.tokenizer
        # One token past the limit is enough to know that an input is too long, without counting all of it.
        rows = tokenizer([prompt + text for text in texts], truncation=True, max_length=limit + 1)["input_ids"]
        for index, row in enumerate(rows):
            if len(row) > limit:
                if not truncate:
                    raise ApiError(
                        413, f"input[{index}] has more than {limit} tokens (the limit, instruction included); "
                        "shorten it or set 'truncate': true", param=f"input[{index}]", code="input_too_long",
                    )
                # The tokenizer's own truncation, as the model's, keeps any special tokens it adds at the ends.
                rows[index] = tokenizer(prompt + texts[index], truncation=True, max_length=limit)["input_ids"]
            if any(token >= self._vocabulary_rows for token in rows[index]):
                raise ApiError(
                    400, f"input[{index}] contains one of the model's reserved tokens (<|llm2vec_...|>)",
                    param=f"input[{index}]", code="reserved_token",
                )
        return rows

    def states_tensor(self, z: list[list[float]]) -> torch.Tensor:
        """A client's z (C x H nested lists) as a (1, C, H) tensor; wrong shapes and non-finite values are 400s."""
        shape = (len(z), len(z[0]) if z else 0)
        if shape != self.states_shape or any(len(row) != shape[1] for row in z):
            raise ApiError(
                400, f"'z' must be {self.states_shape[0]} x {self.states_shape[1]} (compression tokens x hidden size)",
                param="z", code="invalid_shape",
            )
        states = torch.tensor(z, dtype=torch.float32)
        if not torch.isfinite(states).all():
            raise ApiError(400, "'z' contains a non-finite value", param="z", code="invalid_value")
        return states.unsqueeze(0)

    # -------------------------------------------------------------------------------------- model side

    @torch.inference_mode()
    def embed(self, rows: Sequence[list[int]], observe: PassObserver | None = None) -> list[Encoded]:
        """e and z for each row, in order, in forward passes bounded by serving.max_batch_tokens."""
        out: list[Encoded | None] = [None] * len(rows)
        groups = split_by_token_budget(
            [len(row) for row in rows], self.serving.max_batch_tokens, self.special_tokens, self.pass_cost_tokens
        )
        for group in groups:
            started = time.perf_counter()
            ids, mask = pad_rows([rows[i] for i in group], self.model.tokenizer.pad_token_id, "left", self.model.device)
            states, embeddings = self.model.compress(ids, mask)  # (B, C, H), (B, D)
            states, embeddings = states.float().cpu().numpy(), embeddings.float().cpu().numpy()
            for position, index in enumerate(group):
                out[index] = Encoded(embedding=embeddings[position], states=states[position])
            if observe:
                observe(len(group), len(group) * (ids.shape[1] + self.special_tokens), time.perf_counter() - started)
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def decode(self, states: torch.Tensor, max_new_tokens: int) -> list[str]:
        """What the frozen LLM writes when fed z (B, C, H)."""
        texts = self.model.decode(states.to(self.model.device), max_new_tokens=max_new_tokens)
        return [texts] if isinstance(texts, str) else list(texts)

    def check_decode_tokens(self, max_new_tokens: int) -> None:
        if max_new_tokens > self.serving.max_decode_tokens:
            raise ApiError(
                400, f"max_new_tokens {max_new_tokens} is over this server's limit of {self.serving.max_decode_tokens}",
                param="max_new_tokens", code="max_new_tokens_too_large",
            )

    def check_dimensions(self, dimensions: int | None) -> None:
        size = self.model.config.embedding_dim
        if dimensions is not None and dimensions > size:
            raise ApiError(
                400, f"dimensions {dimensions} is larger than the model's embedding size {size}; "
                f"ask for 1 to {size} (the first values, renormalised)", param="dimensions", code="invalid_dimensions",
            )

