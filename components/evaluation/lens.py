"""Reading an embedding: the text the frozen LLM writes from it, and a logit lens on its compression tokens.

Two lenses apply the LLM's output head (`backbone.get_output_embeddings()`, W_U) to each of the C compression tokens:

    z lens   W_U z_i   z = W_r h + b_r is what the LLM reads when it decodes the embedding (an input embedding); with
                       tied input/output embeddings (SmolLM2, Qwen3-0.6B) this ranks the vocabulary rows z points at
    h lens   W_U h_i   h = the backbone's last hidden state at compression position i, after its final norm: the
                       tokens the LLM would predict next at that position of [x ; t ; c]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from components.model import LLM2VecGen


@dataclass
class LensRow:
    position: int  # index of the compression token, 0..C-1
    z_tokens: list[tuple[str, float]]  # (token, probability under softmax(W_U z_i)), best first
    h_tokens: list[tuple[str, float]]  # (token, probability under softmax(W_U h_i)), best first


@torch.inference_mode()
def logit_lens(model: LLM2VecGen, text: str, top_k: int = 5, prompt_name: str | None = "query") -> list[LensRow]:
    """Per compression token, the top-k tokens of both lenses for `prompt + text`."""
    prompt = model.config.prompts.get(prompt_name, "") if prompt_name else ""
    states = model.compression_states(*model.tokenize_queries([text], prompt))  # h: (1, C, H), final-normed
    z, _ = model.project(states)  # (1, C, H), input space
    head = model.backbone.get_output_embeddings()
    dtype = head.weight.dtype
    z_top = torch.softmax(head(z.to(dtype)).float(), dim=-1)[0].topk(top_k, dim=-1)  # (C, k)
    h_top = torch.softmax(head(states.to(dtype)).float(), dim=-1)[0].topk(top_k, dim=-1)  # (C, k)

    def tokens(top, row: int) -> list[tuple[str, float]]:
        return [(model.tokenizer.decode([index]), float(p)) for p, index in zip(top.values[row].tolist(), top.indices[row].tolist(), strict=True)]

    return [LensRow(position, tokens(z_top, position), tokens(h_top, position)) for position in range(z.shape[1])]
