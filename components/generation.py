"""The frozen LLM's answers to the queries: chat-template rendering, length-grouped batched decoding, the actor.

For a batch of queries:
    prompt_i   = chat_template([system?, user: query_i], add_generation_prompt, enable_thinking)
    order      = prompts sorted by token length, cut into batches of `generation.batch_size` (little padding)
    prefill    = the prefix every prompt of the batch shares (the template's opening, a system prompt) runs once,
                 its KV cache copied to each row; then the rows' own tokens, left-padded (B, L), positions
                 counting real tokens only
    decoding   = one forward pass per new token over a KV cache that reserves room for the whole answer
                 (components/kv_cache.py); a row is finished at EOS or a stop string, and the batch (with its
                 cache) halves whenever at most half of its rows are still answering; on a CPU the actor makes a
                 decoding copy of the linear weights once (generation.pack_weights): a GGUF backbone's kept in its
                 quantization blocks and rebuilt exactly in a kernel (components/block_linear.py), others packed
                 for MKL (components/packed_linear.py)
    response_i = the new tokens before EOS, decoded, cut before the first stop string;
                 finish_reason "stop" (EOS or a stop string) or "length" (max_new_tokens reached)

Greedy by default; with sampling (generation.do_sample, or generation.sampling: model_default for the backbone's own
generation_config) the logits are shaped as transformers' generate() shapes them (repetition penalty, then
temperature, top-k, top-p, min-p: shape_logits) and a token drawn by inverting each row's cumulative distribution at
one uniform number from that row's own random stream (seeded by data.seed and the row's id): all on the model's
device, only B numbers cross to it per step, and a row's answer depends neither on its batch nor on its shard, so a
re-run or resumed shard writes the same text. `generate_responses` is what the Ray actor runs; benchmarks/generation.py
times its two steps (length_batches, decode_batch) against a plain `model.generate` loop.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import pyarrow as pa
import torch
from transformers import AutoConfig, AutoTokenizer, DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from components.backbone import build_byte_tokenizer, load_backbone, resolve_folder
from components.kv_cache import reserved_cache
from components.model import pad_rows
from components.packed_linear import pack_linears
from components.spec import SAMPLING_KEYS, BackboneSpec, GenerationSpec

RESPONSE_SCHEMA = pa.schema([
    ("id", pa.int64()),
    ("query", pa.string()),
    ("response", pa.string()),
    ("prompt_tokens", pa.int32()),
    ("response_tokens", pa.int32()),
    ("finish_reason", pa.string()),
])


class GenerationError(ValueError):
    """Generation cannot run as the spec asks; the message names the key."""


@dataclass(frozen=True)
class Generated:
    response: str
    prompt_tokens: int
    response_tokens: int  # new tokens before EOS (a stop string's tokens included)
    finish_reason: str  # "stop" or "length"


# -------------------------------------------------------------------------------------------------- prompts


def render_prompt(tokenizer: PreTrainedTokenizerBase, query: str, generation: GenerationSpec) -> str:
    """The chat-formatted prompt for one query, ending where the assistant's answer starts."""
    if not tokenizer.chat_template:
        raise GenerationError("backbone: the tokenizer has no chat template; generation needs a chat (instruct) model")
    messages = [{"role": "system", "content": generation.system_prompt}] if generation.system_prompt else []
    messages.append({"role": "user", "content": query})
    # enable_thinking is read by templates that know it (Qwen3: False skips the <think> block) and ignored by others.
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=generation.enable_thinking
    )


def tokenize_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> list[list[int]]:
    # The chat template already holds every special token (BOS included where the model wants one).
    return tokenizer(list(prompts), add_special_tokens=False)["input_ids"]


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first (a too-large batch fails at once)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """`text` up to (not including) the earliest stop string, and whether one was found."""
    cut = min((index for index in (text.find(stop) for stop in stops) if index >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """EOS ids of the tokenizer and of the model's generation config (chat models often have several)."""
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids = set(configured if isinstance(configured, list) else [configured])
    ids.add(tokenizer.eos_token_id)
    return {token for token in ids if token is not None}


# ------------------------------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class Sampling:
    """The decoding rule, resolved: from the spec, or from the backbone's generation_config (sampling: model_default)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0


def resolve_sampling(generation: GenerationSpec, generation_config=None) -> Sampling:
    """The spec's keys, or (model_default) the generation_config's, an unset one meaning off as in transformers 5."""
    if generation.sampling == "spec":
        return Sampling(**{key: getattr(generation, key) for key in SAMPLING_KEYS})
    if generation_config is None:
        raise GenerationError("generation.sampling: model_default needs the backbone's generation_config")
    values = {key: getattr(generation_config, key, None) for key in SAMPLING_KEYS}
    return Sampling(**{key: value for key, value in values.items() if value is not None})


def row_seeds(seed: int, ids: Sequence[int]) -> list[int]:
    """One seed per row from the run's seed and the row's id: a row's stream does not depend on its shard or batch."""
    return [seed * 1_000_003 + row_id for row_id in ids]


def shape_logits(logits: torch.Tensor, sampling: Sampling, seen: torch.Tensor | None = None) -> torch.Tensor:
    """(B, V) logits -> float32 scores, -inf where a token cannot be drawn, as transformers' generate() shapes them:
    RepetitionPenaltyLogitsProcessor (over `seen`, the (B, V) tokens of each row's prompt and answer so far), then
    when sampling TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper, in that order."""
    scores = logits.float()
    if sampling.repetition_penalty != 1.0 and seen is not None:
        penalised = torch.where(scores < 0, scores * sampling.repetition_penalty, scores / sampling.repetition_penalty)
        scores = torch.where(seen, penalised, scores)
    if not sampling.do_sample:
        return scores
    scores = scores / sampling.temperature
    if sampling.top_k and sampling.top_k < scores.shape[-1]:
        kth = torch.topk(scores, sampling.top_k, dim=-1).values[:, -1:]  # (B, 1): ties with the k-th stay in
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1.0:
        ascending, order = torch.sort(scores, dim=-1)
        # Drop the least likely tokens whose total mass is at most 1 - top_p; the most likely one always stays.
        drop = ascending.softmax(-1).cumsum(-1) <= 1 - sampling.top_p
        drop[:, -1] = False
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    if sampling.min_p > 0:
        probs = scores.softmax(-1)
        floor = sampling.min_p * probs.max(dim=-1, keepdim=True).values
        scores = scores.masked_fill(probs < floor, float("-inf"))
    return scores


def next_tokens(scores: torch.Tensor, sampling: Sampling, uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """(B, V) shaped scores -> (B,) token ids: argmax, or the inverse of each row's cumulative distribution at its
    uniform number in [0, 1) (B values on the scores' device): an exact draw, and no (B, V) tensor leaves the device."""
    if not sampling.do_sample:
        return scores.argmax(-1)
    cumulative = scores.softmax(-1).double().cumsum(-1)  # (B, V)
    targets = uniforms.to(cumulative.dtype).unsqueeze(1) * cumulative[:, -1:]  # (B, 1)
    tokens = torch.searchsorted(cumulative, targets, right=True).squeeze(1)
    return tokens.clamp(max=scores.shape[-1] - 1)


class RowStreams:
    """One random stream per row (random.Random: cheap, exact, the same on every machine), one number per step."""

    def __init__(self, seeds: Sequence[int]):
        self.streams = [random.Random(seed) for seed in seeds]

    def uniforms(self, rows: Sequence[int], device: torch.device) -> torch.Tensor:
        return torch.tensor([self.streams[row].random() for row in rows], dtype=torch.float64, device=device)


# ------------------------------------------------------------------------------------------------- decoding


def generate_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    queries: Sequence[str],
    generation: GenerationSpec,
    seed: int = 0,
    ids: Sequence[int] | None = None,
) -> list[Generated]:
    """Answers to `queries`, in their order, decoded in length-grouped batches; sampled rows draw from streams seeded
    by `seed` and their `ids` (default: their positions)."""
    prompts = tokenize_prompts(tokenizer, [render_prompt(tokenizer, query, generation) for query in queries])
    seeds = row_seeds(seed, ids if ids is not None else range(len(queries)))
    results: list[Generated | None] = [None] * len(queries)
    for batch in length_batches([len(prompt) for prompt in prompts], generation.batch_size):
        answers = decode_batch(model, tokenizer, [prompts[i] for i in batch], generation, [seeds[i] for i in batch])
        for index, answer in zip(batch, answers, strict=True):
            results[index] = answer
    return results  # type: ignore[return-value]


@torch.inference_mode()
def decode_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    generation: GenerationSpec,
    seeds: Sequence[int] | None = None,
) -> list[Generated]:
    """Continue each prompt until EOS, a stop string or max_new_tokens (see kept_width for finished rows); sampled
    rows draw from streams seeded by `seeds` (default: their positions)."""
    device = model.device
    eos = stop_token_ids(model, tokenizer)
    sampling = resolve_sampling(generation, model.generation_config)
    streams = RowStreams(seeds if seeds is not None else range(len(prompts))) if sampling.do_sample else None
    seen = None  # (B, V) tokens of each row's prompt and answer so far, on the device: for the repetition penalty
    if sampling.repetition_penalty != 1.0:
        seen = torch.zeros(len(prompts), model.config.vocab_size, dtype=torch.bool, device=device)
        for row, prompt in enumerate(prompts):
            seen[row, torch.tensor(prompt, device=device)] = True
    cache = decoding_cache(model, max(len(prompt) for prompt in prompts) + generation.max_new_tokens)
    # The chat template's opening (system prompt included) is the same for every prompt: run it once, share its cache.
    shared = shared_prefix_length(prompts)
    if shared:
        prefix = torch.tensor([prompts[0][:shared]], device=device)  # (1, shared)
        model(input_ids=prefix, cache=cache, use_cache=True, logits_to_keep=1)
        cache.batch_repeat_interleave(len(prompts))
    suffix_ids, suffix_mask = pad_rows([prompt[shared:] for prompt in prompts], tokenizer.pad_token_id, "left", device)
    # Padding sits between the shared prefix and each row's own tokens; it is masked out, and positions count real
    # tokens only, so a row's answer does not depend on the other rows of its batch.
    mask = torch.cat([suffix_mask.new_ones(len(prompts), shared), suffix_mask], dim=1)  # (B, shared + L)
    positions = shared + (suffix_mask.cumsum(1) - 1).clamp(min=0)  # (B, L)
    logits = model(
        input_ids=suffix_ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1
    ).logits[:, -1]  # (B, V)
    rows = list(range(len(prompts)))  # which prompt each batch row continues
    done = [False] * len(prompts)
    new_tokens: list[list[int]] = [[] for _ in prompts]
    finish = ["length"] * len(prompts)
    for step in range(generation.max_new_tokens):
        uniforms = streams.uniforms(rows, device) if streams else None
        chosen = next_tokens(shape_logits(logits, sampling, seen), sampling, uniforms)  # (b,)
        if seen is not None:
            seen[torch.arange(len(rows), device=device), chosen] = True
        for index, token in zip(rows, chosen.tolist(), strict=True):
            if done[index]:
                continue
            if token in eos:
                done[index], finish[index] = True, "stop"
                continue
            new_tokens[index].append(token)
            if generation.stop and cut_at_stop(tokenizer.decode(new_tokens[index]), generation.stop)[1]:
                done[index], finish[index] = True, "stop"
        answering = [row for row, index in enumerate(rows) if not done[index]]
        if not answering or step == generation.max_new_tokens - 1:
            break
        width = kept_width(len(answering), len(rows))
        if width < len(rows):
            finished = [row for row, index in enumerate(rows) if done[index]]
            keep = torch.tensor(sorted(answering + finished[: width - len(answering)]), device=device)
            cache.batch_select_indices(keep)
            mask, positions = mask[keep], positions[keep]
            seen = seen[keep] if seen is not None else None
            rows = [rows[row] for row in keep.tolist()]
        # A finished row still in the batch is fed padding; what it computes is never read.
        feed = torch.tensor([[tokenizer.pad_token_id if done[i] else new_tokens[i][-1]] for i in rows], device=device)
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        positions = positions[:, -1:] + 1
        step_out = model(input_ids=feed, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        logits = step_out.logits[:, -1]  # (b, V)
    results = []
    for prompt, tokens, reason in zip(prompts, new_tokens, finish, strict=True):
        text, _ = cut_at_stop(tokenizer.decode(tokens, skip_special_tokens=True), generation.stop)
        results.append(Generated(text, len(prompt), len(tokens), reason))
    return results


def decoding_cache(model: PreTrainedModel, capacity: int) -> DynamicCache:
    """On a CPU a cache that reserves `capacity` positions (components/kv_cache.py); on a GPU transformers' own.

    On a CPU, DynamicCache's torch.cat of every layer's cache at every step cost 11-17% of a step. On a GPU the
    reserved cache's keys and values are strided views, and with them PyTorch's cuDNN attention was slow on
    every new batch shape (an H100, bf16, 16 rows x 48 tokens: 2.8-3.6 s per batch against 1.25-2.0 s with
    DynamicCache and 1.1-2.1 s for plain model.generate), while the copies cost a GPU next to nothing.
    """
    if model.device.type == "cpu":
        return reserved_cache(model.config, capacity)
    return DynamicCache(config=model.config)


def kept_width(answering: int, width: int) -> int:
    """How many rows a batch keeps computing when `answering` of its `width` rows are not finished yet.

    The batch halves only once at most half of it is still answering; until then finished rows ride along. Rows
    are not cost: on our 2-core CPU a 576x1536 linear layer takes 0.70 ms for 12 to 15 rows but 0.47 ms for 16
    (the BLAS switches kernels at 16), and on a GPU a decoding step costs about the same for any small batch, so
    dropping single rows would save nothing and re-copy the KV cache each time. With MKL-packed weights
    (components/packed_linear.py) only the full width runs the packed kernels, yet halving still pays: a SmolLM2
    step of 16 packed rows took 157-165 ms here, one of 8 plain rows 125-150 ms, of 4 plain rows 98-129 ms. The
    block kernel (components/block_linear.py) takes any width up to 16 and costs less for fewer rows.
    """
    while answering <= width // 2:
        width //= 2
    return width


def shared_prefix_length(prompts: list[list[int]]) -> int:
    """How many leading tokens all prompts share, leaving each at least one token of its own; 0 for one prompt."""
    if len(prompts) < 2:
        return 0
    shared, limit = 0, min(len(prompt) for prompt in prompts) - 1
    while shared < limit and all(prompt[shared] == prompts[0][shared] for prompt in prompts):
        shared += 1
    return shared


# ------------------------------------------------------------------------------------------------ the actor


class ResponseGenerator:
    """Ray Data worker: loads the backbone once per actor, then answers one whole shard of queries per call."""

    def __init__(self, backbone: BackboneSpec, generation: GenerationSpec, seed: int):
        self.generation = generation
        self.seed = seed
        # As many threads as CPUs reserved for this actor: more would fight the other actors for the same cores.
        torch.set_num_threads(max(1, int(generation.num_cpus_per_actor)))
        self.backbone = load_backbone(backbone)
        if torch.cuda.is_available():  # Ray exposes a GPU only to actors that asked for one
            self.backbone.model.to("cuda")
        # The actor's backbone only ever decodes, so its decoding copy of the weights is made once, for the batch size.
        self.packed = pack_linears(self.backbone.model, generation.batch_size) if generation.pack_weights else None

    def __call__(self, shard: pa.Table) -> pa.Table:
        ids = shard.column("id").to_pylist()
        queries = shard.column("query").to_pylist()
        # Each row's random stream depends on the run's seed and its id, not on which actor runs it, when, or beside what.
        with self.packed or nullcontext():
            results = generate_responses(self.backbone.model, self.backbone.tokenizer, queries, self.generation, self.seed, ids)
        return responses_table(ids, queries, results)


def responses_table(ids: Sequence[int], queries: Sequence[str], results: Sequence[Generated]) -> pa.Table:
    return pa.table(
        {
            "id": ids,
            "query": queries,
            "response": [r.response for r in results],
            "prompt_tokens": [r.prompt_tokens for r in results],
            "response_tokens": [r.response_tokens for r in results],
            "finish_reason": [r.finish_reason for r in results],
        },
        schema=RESPONSE_SCHEMA,
    )


# ------------------------------------------------------------------------------ the backbone, without weights


@dataclass(frozen=True)
class BackboneIdentity:
    """What the cache key needs from the backbone, found without loading its weights where possible."""

    fingerprint: str
    chat_template: str
    hidden_size: int


def backbone_identity(spec: BackboneSpec) -> BackboneIdentity:
    if spec.source == "random":  # tiny: building it is the cheapest way to know its exact weights
        backbone = load_backbone(spec)
        return BackboneIdentity(backbone.fingerprint, backbone.tokenizer.chat_template or "", spec.random.hidden_size)
    if spec.source == "hub":
        fingerprint, location = f"hub:{spec.name}@{spec.revision or 'default'}", spec.name
    else:
        folder, fingerprint = resolve_folder(spec)
        location = str(folder)
    tokenizer = AutoTokenizer.from_pretrained(location, revision=spec.revision if spec.source == "hub" else None)
    config = AutoConfig.from_pretrained(location, revision=spec.revision if spec.source == "hub" else None)
    return BackboneIdentity(fingerprint, tokenizer.chat_template or "", config.hidden_size)


def load_tokenizer(spec: BackboneSpec) -> PreTrainedTokenizerBase:
    """The backbone's tokenizer alone (for rendering prompts on the driver)."""
    if spec.source == "random":
        return build_byte_tokenizer()
    if spec.source == "hub":
        return AutoTokenizer.from_pretrained(spec.name, revision=spec.revision)
    return AutoTokenizer.from_pretrained(resolve_folder(spec)[0])


def check_backend(generation: GenerationSpec) -> None:
    if generation.backend == "vllm":
        raise GenerationError(
            "generation.backend: 'vllm' (ray.data.llm.build_processor) is not implemented yet; use backend: hf"
        )

