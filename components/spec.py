"""The run spec: one typed, validated object built from a YAML file.

A spec file may name a `base:` spec (resolved relative to itself) whose keys it overrides, and the command
line may override any leaf with `--set dotted.key=value`. Every error is raised as `SpecError` with the file,
the full key path and, for a likely typo, the closest valid key, so that callers can print it and exit
instead of showing a traceback.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from components.prompts import PROMPT_SETS, prompt_set

if typing.TYPE_CHECKING:
    from components.storage import RemotePath


class SpecError(ValueError):
    """A spec (file, inheritance chain or override) is not valid; the message says where and why."""


class Section(BaseModel):
    """Base of every spec section: unknown keys are errors, values are immutable after validation."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------------------------- sections


class RandomBackboneSpec(Section):
    """A tiny randomly initialised model built in code (tests, CI): no weights are read from anywhere."""

    architecture: Literal["llama", "qwen2", "qwen3"] = "llama"
    hidden_size: int = Field(64, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    intermediate_size: int = Field(128, ge=8)
    max_position_embeddings: int = Field(2048, ge=64)
    # Std of the random weights; larger than the usual 0.02 so that a tiny model's logits are not near-uniform
    # and its outputs can actually be steered by the trained tokens.
    initializer_range: float = Field(0.02, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _heads_divide(self) -> RandomBackboneSpec:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})")
        return self


class BackboneSpec(Section):
    """Where the frozen causal LLM comes from.

    source: hub (a model id, online only), folder (a local Hugging Face folder), gguf (a .gguf file),
    package (a .gguf file shipped inside an installed Python package: `package` + `file` glob),
    random (a tiny model built from `random`, for tests).
    """

    source: Literal["hub", "folder", "gguf", "package", "random"]
    name: str | None = None
    file: str | None = None
    revision: str | None = None
    random: RandomBackboneSpec | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"

    @model_validator(mode="after")
    def _source_fields(self) -> BackboneSpec:
        needs = {"hub": ["name"], "folder": ["name"], "gguf": ["name"], "package": ["name", "file"], "random": ["random"]}
        missing = [key for key in needs[self.source] if getattr(self, key) is None]
        if missing:
            raise ValueError(f"source '{self.source}' needs {', '.join(missing)}")
        return self


class MNTPSpec(Section):
    """Masked next-token prediction (LLM2Vec step 2), as a LoRA adapter; defaults: the official recipes (1000 steps of
    32 texts, lr 5e-5, 20% of the tokens masked with '_' as mask token, 80/10/10 mask/random/keep)."""

    steps: int = Field(1000, ge=0)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(5e-5, gt=0)
    mask_probability: float = Field(0.2, gt=0, lt=1)
    mask_token: Literal["blank", "eos"] = "blank"  # blank: '_', as LLM2Vec does for decoders without a mask token
    max_tokens: int = Field(512, ge=2)


class SimCSESpec(Section):
    """Unsupervised SimCSE (LLM2Vec step 3), a second LoRA adapter on the merged MNTP weights: a text's two dropout
    views are positives, the batch's other texts negatives; defaults: the official recipe (1000 steps of 128 texts,
    lr 3e-5, attention dropout 0.3, temperature 0.05 = loss scale 20, texts cut at 128 tokens)."""

    steps: int = Field(1000, ge=0)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(3e-5, gt=0)
    dropout: float = Field(0.3, ge=0, lt=1)
    temperature: float = Field(0.05, gt=0)
    max_tokens: int = Field(128, ge=1)


class TeacherTrainSpec(Section):
    """Train an LLM2Vec teacher from the backbone itself (the `teacher` stage of workflows.run).

    texts: which of the run's own texts to train on: the spec's queries and/or the generated answers; sources:
    more unlabeled text files (same keys as data.sources); max_texts: at most this many texts, sampled with seed.
    """

    texts: list[Literal["queries", "responses"]] = Field(default_factory=lambda: ["queries", "responses"])
    sources: list[DataSourceSpec] = Field(default_factory=list)
    max_texts: int | None = Field(None, ge=1)
    mntp: MNTPSpec = MNTPSpec()
    simcse: SimCSESpec = SimCSESpec()
    lora_r: int = Field(16, ge=1)
    lora_alpha: float = Field(32, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    lora_targets: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    warmup_steps: int = Field(0, ge=0)  # per phase; then cosine decay to 0 at the phase's last step
    grad_clip: float = Field(1.0, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    precision: Literal["fp32", "bf16"] = "fp32"
    seed: int = 42
    checkpoint_every: int = Field(100, ge=1)
    log_every: int = Field(10, ge=1)
    num_workers: int = Field(1, ge=1)  # data parallel: each worker takes batch_size / num_workers texts
    use_gpu: bool = False
    max_failures: int = Field(1, ge=0)

    @model_validator(mode="after")
    def _has_text(self) -> TeacherTrainSpec:
        if not self.texts and not self.sources:
            raise ValueError("no text to train on: give texts (queries, responses) or sources")
        if self.mntp.steps + self.simcse.steps == 0:
            raise ValueError("mntp.steps and simcse.steps are both 0: nothing to train")
        for phase in (self.mntp, self.simcse):
            if phase.batch_size % self.num_workers:
                raise ValueError(f"batch sizes must be divisible by num_workers ({self.num_workers})")
        return self


class TeacherSpec(Section):
    """The unsupervised embedder whose vectors of the responses are the alignment targets.

    kind: sentence_transformers (a folder, hub id, or a package shipping one: `package` + `path_in_package`),
    hf_mean_pool (mean pooling of any HF encoder), backbone_mean_pool (the backbone's own mean-pooled states),
    llm2vec (a decoder with bidirectional attention, mean pooling (see `pooling`): `name` is a hub id or
    folder of an MNTP adapter in the published layout, of a merged model, or of a teacher trained by the `teacher`
    stage; `adapters` are applied on top in order, e.g. ...-mntp-unsup-simcse, the last one unmerged unless
    merge_adapters; unnormalised by default, as LLM2Vec-Gen uses it). With `train` (kind llm2vec only, no name) the `teacher` stage trains it from the backbone.
    """

    kind: Literal["sentence_transformers", "hf_mean_pool", "backbone_mean_pool", "llm2vec"]
    name: str | None = None
    package: str | None = None
    path_in_package: str = ""
    adapters: list[str] = Field(default_factory=list)  # llm2vec: LoRA adapters applied after the MNTP one
    # mean: over every attended token, special ones (Llama's BOS) included: the official LLM2Vec-Gen targets
    # (llm2vec_gen/losses.py get_teacher_embeddings); mean_text (llm2vec only): over the text's own tokens, as the
    # llm2vec package's LLM2Vec.encode pools (skip_instruction), a BOS state then not averaged into every target.
    pooling: Literal["mean", "mean_text"] = "mean"
    # llm2vec: merge the last adapter (e.g. SimCSE) into the weights too. Off: it stays a LoRA branch beside them, as
    # the official trainer loads it (in bf16 a merge rounds small deltas away); on: a little faster per text.
    merge_adapters: bool = False
    normalize: bool = True  # llm2vec: false unless given
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # llm2vec's weights
    batch_size: int = Field(64, ge=1)
    max_tokens: int = Field(512, ge=1)  # truncation of each response for hf_mean_pool, backbone_mean_pool, llm2vec
    # The teacher stage's Ray Data actor pool: one model load per actor.
    num_actors: int = Field(1, ge=1)
    num_cpus_per_actor: float = Field(1, gt=0)
    num_gpus_per_actor: float = Field(0, ge=0)
    train: TeacherTrainSpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _llm2vec_unnormalised(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("kind") == "llm2vec" and "normalize" not in data:
            data = {**data, "normalize": False}  # LLM2Vec-Gen regresses onto the raw mean (no normalisation)
        return data

    @model_validator(mode="after")
    def _has_location(self) -> TeacherSpec:
        if self.train is not None:
            if self.kind != "llm2vec":
                raise ValueError(f"train: only kind llm2vec can be trained, not '{self.kind}'")
            if self.name is not None:
                raise ValueError("give either name (a trained teacher) or train (train one here), not both")
            return self
        if self.kind != "backbone_mean_pool" and self.name is None and self.package is None:
            raise ValueError(f"teacher kind '{self.kind}' needs name or package")
        if self.adapters and self.kind != "llm2vec":
            raise ValueError(f"adapters: only kind llm2vec takes adapters, not '{self.kind}'")
        if self.pooling == "mean_text" and self.kind != "llm2vec":
            raise ValueError(f"pooling: mean_text is for kind llm2vec, not '{self.kind}'")
        return self


class TokensSpec(Section):
    """T thought tokens then C compression tokens appended to every input (the paper: 10 + 10)."""

    thought: int = Field(10, ge=0, le=256)
    compression: int = Field(10, ge=1, le=256)


class LossSpec(Section):
    """Total loss = reconstruction * L_recon + alignment * L_align.

    alignment_kind: mse (the paper) or cosine (1 - cos(e, t): scale-free, so normalised 384-d targets whose
    squared error is ~1/384 per dimension still steer the shared special tokens).
    center_targets: subtract the training rows' mean teacher vector from every target, so that the student
    learns what tells answers apart rather than the direction all of them share (anisotropic teachers).
    """

    reconstruction: float = Field(1.0, ge=0)
    alignment: float = Field(1.0, ge=0)
    alignment_kind: Literal["mse", "cosine"] = "mse"
    center_targets: bool = False

    @model_validator(mode="after")
    def _something_to_learn(self) -> LossSpec:
        if self.reconstruction == 0 and self.alignment == 0:
            raise ValueError("at least one of reconstruction and alignment must be > 0")
        return self


class ModelSpec(Section):
    """Choices of the trainable head and the instructions stored with the model.

    The LLM's last hidden states are highly anisotropic (at the compression positions of SmolLM2-135M the mean
    vector is ~6x longer than the typical deviation from it), so randomly initialised projections spend most
    of a short training learning to cancel that shared direction. Two data-dependent starts, computed before
    training from `init_samples` training queries with the untrained special tokens:
    reconstruction_init: random | identity | moments (identity with a per-dimension scale and shift that maps
        the states' mean and spread onto those of the vocabulary's input embeddings: z then looks like tokens);
    alignment_init: random | ridge (the ridge-regression readout from the mean of z to the teacher targets,
        computed on standardised features with penalty init_ridge * n: a linear probe as the starting point).
    """

    reconstruction_init: Literal["random", "identity", "moments"] = "random"
    alignment_init: Literal["random", "ridge"] = "random"
    init_samples: int = Field(512, ge=2)
    init_ridge: float = Field(0.1, gt=0)
    # After the last step, solve the alignment projection again (ridge) on the final compression states: the
    # exact minimiser of the alignment loss (+ the ridge penalty) for the features training ended with.
    refit_alignment: bool = False
    max_query_tokens: int = Field(512, ge=1)
    # Instructions prefixed to a text before encoding, stored with the model: a mapping in mteb's prompt keys (task
    # name, task type, query, document; components/evaluation/encoders.py), or a named set (components/prompts.py):
    # `generative` (the official evaluation protocol: generative instructions on the query side, "Summarize the
    # following passage: " on the document side) or `bare` (none). The paper phrases inputs as requests to answer.
    prompts: dict[str, str] | str = Field(
        default_factory=lambda: {
            "query": "Generate a passage that best answers this question: ",
            "document": "Summarize the following passage: ",
        }
    )

    @field_validator("prompts", mode="before")
    @classmethod
    def _mapping_or_known_set(cls, value: Any) -> Any:
        if not isinstance(value, dict) and not (isinstance(value, str) and value in PROMPT_SETS):
            raise ValueError(f"must be a mapping or one of the prompt sets {', '.join(PROMPT_SETS)}")
        return value

    @property
    def prompt_mapping(self) -> dict[str, str]:
        """The prompts a model built from this spec stores (a named set resolved to its mapping)."""
        return prompt_set(self.prompts)


class DataSourceSpec(Section):
    """One file (or HF dataset when online) of unlabeled queries."""

    path: str
    format: Literal["auto", "jsonl", "json", "parquet", "csv", "tsv", "hf"] = "auto"
    text_field: str | None = None
    template: str | None = None  # e.g. "{instruction}\n{input}", joins fields
    weight: float = Field(1.0, gt=0)
    limit: int | None = Field(None, ge=1)
    split: str | None = None
    subset: str | None = None  # the configuration name of a Hugging Face dataset (format hf), e.g. "main"
    # A chat dataset (e.g. allenai/tulu-3-sft-mixture): this field holds a list of {role, content} messages; only
    # single-turn conversations (exactly one user message, then one assistant message) are kept, and the query is
    # the user message. Used instead of text_field / template.
    messages_field: str | None = None
    # A field holding a given answer to the query (e.g. the `answer` of McGill-NLP/llm2vec-gen-tulu, the official
    # generations): the generate stage then passes these answers through instead of generating. Either every source
    # of data.sources gives one or none does.
    response_field: str | None = None

    @model_validator(mode="after")
    def _one_text_rule(self) -> DataSourceSpec:
        if self.messages_field is not None:
            if self.text_field is not None or self.template is not None:
                raise ValueError("give exactly one of text_field, template and messages_field")
            return self
        if (self.text_field is None) == (self.template is None):
            raise ValueError("give exactly one of text_field and template")
        return self


class DataSpec(Section):
    """The queries: sources mixed by weight when `limit` is set, sampled with `seed`, exact duplicates dropped."""

    sources: list[DataSourceSpec] = Field(default_factory=list)
    limit: int | None = Field(None, ge=1)
    seed: int = 0
    dedup: bool = True
    max_query_chars: int = Field(2000, ge=1)
    holdout_fraction: float = Field(0.0, ge=0, lt=1)
    # Of the held-out rows, at most this many (a seeded sample) are scored during training, on one worker.
    holdout_max_rows: int | None = Field(2048, ge=1)

    @model_validator(mode="after")
    def _answers_everywhere_or_nowhere(self) -> DataSpec:
        given = [source.response_field is not None for source in self.sources]
        if any(given) and not all(given):
            raise ValueError("sources: either every source gives its answers (response_field) or none does; "
                             "the generate stage passes given answers through or generates all of them")
        return self

    @property
    def given_responses(self) -> bool:
        return bool(self.sources) and all(source.response_field is not None for source in self.sources)


class GenerationSpec(Section):
    """How the frozen LLM answers each query (greedy by default).

    sampling: spec (the keys below: greedy unless do_sample) or model_default (the backbone's own generation_config:
    do_sample, temperature, top_p, top_k, min_p, repetition_penalty; what the official response_generation.py gets
    from model.generate(), e.g. Qwen3's temperature 0.6, top-p 0.95, top-k 20). Sampled answers are drawn on the
    model's device, each row from its own random stream (seeded by data.seed and the row's id), so that a re-run or
    resumed shard, or another batch size, writes the same answers.
    """

    backend: Literal["hf", "vllm"] = "hf"
    max_new_tokens: int = Field(64, ge=1)
    sampling: Literal["spec", "model_default"] = "spec"
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # 0: off
    min_p: float = Field(0.0, ge=0, lt=1)  # 0: off
    repetition_penalty: float = Field(1.0, gt=0)  # 1: off; applies to greedy decoding too, as in transformers
    stop: list[str] = Field(default_factory=list)
    system_prompt: str | None = None
    enable_thinking: bool = False
    batch_size: int = Field(16, ge=1)
    num_actors: int = Field(1, ge=1)
    num_cpus_per_actor: float = Field(1, gt=0)
    num_gpus_per_actor: float = Field(0, ge=0)
    # Queries per output file; a killed run restarts at the first missing file, so this bounds the lost work.
    shard_size: int = Field(256, ge=1)
    # On a CPU, decode through a second copy of the linear weights made for small batches: a GGUF backbone's weights
    # kept in their quantization blocks and rebuilt exactly in a kernel (components/block_linear.py; 92 MiB for
    # SmolLM2), other weights packed for MKL's GEMM (components/packed_linear.py; their size again). Same answers,
    # faster steps. Ignored on a GPU.
    pack_weights: bool = True

    @model_validator(mode="after")
    def _one_source_of_sampling(self) -> GenerationSpec:
        # Keys left at their defaults are fine (a dumped spec, e.g. the one sent to Ray workers, holds every key).
        given = {key for key in SAMPLING_KEYS if getattr(self, key) != type(self).model_fields[key].default}
        if self.sampling == "model_default" and given:
            raise ValueError(f"sampling: model_default takes {', '.join(sorted(given))} from the backbone's "
                             "generation_config; set sampling: spec to give them here")
        return self


# The decoding keys that generation.sampling: model_default reads from the backbone's generation_config instead.
SAMPLING_KEYS = ("do_sample", "temperature", "top_p", "top_k", "min_p", "repetition_penalty")


class TrainingSpec(Section):
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(32, ge=1)  # global, per optimizer step
    micro_batch_size: int = Field(8, ge=1)  # per worker per forward pass
    max_steps: int = Field(5000, ge=1)  # where to stop
    schedule_steps: int | None = Field(None, ge=1)  # length of the LR schedule; default max_steps
    warmup_steps: int = Field(100, ge=0)
    # The LR's shape over schedule_steps (components/training.py lr_factor): linear is transformers'
    # get_linear_schedule_with_warmup, the official one (the recipes); cosine and constant warm up one step earlier.
    schedule: Literal["linear", "cosine", "constant"] = "cosine"
    # Recompute the frozen backbone's layer activations in the backward pass of the reconstruction pass and of an
    # uncached encoding pass instead of keeping them (the official trainer's gradient_checkpointing): less memory
    # (8B backbones on 40 GB cards), same losses and gradients, more time per step (docs/fidelity.md has the figures).
    gradient_checkpointing: bool = False
    grad_clip: float = Field(1.0, ge=0)
    zero_stage: Literal[0, 1, 2, 3] = 0
    precision: Literal["fp32", "bf16"] = "fp32"
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    seed: int = 0
    max_response_tokens: int = Field(128, ge=1)
    checkpoint_every: int = Field(100, ge=1)
    log_every: int = Field(10, ge=1)
    # Held-out rows (data.holdout_fraction) are scored, and a few of them decoded, every eval_every steps.
    eval_every: int | None = Field(None, ge=1)  # default: checkpoint_every
    decode_samples: int = Field(4, ge=0)
    max_failures: int = Field(2, ge=0)
    # The special-token rows sit in the LLM's input space (entries ~1e-2) next to projections of ~1/sqrt(H):
    # their own learning rate is lr * special_lr_scale.
    special_lr_scale: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _batch_divides(self) -> TrainingSpec:
        per_step = self.micro_batch_size * self.num_workers
        if self.batch_size % per_step:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size * num_workers ({per_step})"
            )
        if self.warmup_steps > (self.schedule_steps or self.max_steps):
            raise ValueError("warmup_steps must not exceed schedule_steps (or max_steps)")
        return self

    @property
    def grad_accumulation(self) -> int:
        return self.batch_size // (self.micro_batch_size * self.num_workers)


class TrackingSpec(Section):
    enabled: bool = True
    tracking_uri: str | None = None  # default: MLFLOW_TRACKING_URI, else a SQLite store in the run folder
    experiment: str = "llm2vec-gen"
    registered_model_name: str | None = None


class EvaluationSpec(Section):
    """What `python -m workflows.evaluate` and the evaluate stage run (components/evaluation).

    suite: local (mteb tasks read from files under data_dir, plus AdvBench-IR safety retrieval), mteb-lite (public
    MTEB tasks, online only), auto (each local task whose files exist, else its public MTEB copy when the hub is
    reachable, else skipped with one line: components/evaluation/availability.py), the paper's suites (online only:
    mteb-eng-v2, MTEB(eng, v2)'s 41 tasks; bright, its 12 domains; advbench-ir, AdvBench-IR by the paper's protocol;
    paper, all three; components/evaluation/suites.py) or none; `tasks`, when given, replaces the suite (local or
    MTEB task names, or suites).
    limit: unset = full size (each local task as MTEB evaluates the same data); N = the quick mode: about N
    evaluation items per task (pairs, test rows, queries, candidate pairs), sampled with `seed` so that the score
    keeps its meaning (components/evaluation/tasks.py says how, per task type). Every report says which it was.
    oracle: the response-oracle baseline: the backbone's greedy answer to every evaluation text (the model's
    prompts, the spec's generation settings), embedded by the teacher; the ceiling that distilling the teacher's
    embedding of the answers can reach. Unset: with the baselines.
    """

    suite: Literal["local", "mteb-lite", "mteb-eng-v2", "bright", "advbench-ir", "paper", "auto", "none"] = "local"
    tasks: list[str] = Field(default_factory=list)
    limit: int | None = Field(None, ge=1)
    data_dir: str = "../shared/data"
    baselines: bool = False  # also the teacher and the backbone's training-free baselines (training_free)
    # Which training-free baselines of the backbone `baselines` adds, one column each (components/evaluation/encoders.py):
    # input-centric readouts (mean-pool, last-token: one pass for both) and prompt readouts (prompteol, its
    # chat-template variant prompteol-chat, echo). The check stage's pre-flight compares the oracle with the same ones.
    training_free: list[Literal["mean-pool", "last-token", "prompteol", "prompteol-chat", "echo"]] = Field(
        default_factory=lambda: ["mean-pool", "last-token", "prompteol", "prompteol-chat", "echo"], min_length=1)
    batch_size: int = Field(32, ge=1)
    # Under `limit`, a retrieval corpus keeps the relevant documents of the kept queries plus this many others per query.
    distractors_per_query: int = Field(2, ge=0)
    # Under `limit`, a retrieval corpus also keeps each kept query's closest documents by TF-IDF (not relevant to
    # it): the documents that compete for its top ranks in the whole corpus, so that the score is not inflated.
    hard_negatives_per_query: int = Field(10, ge=0)
    seed: int = 42  # subsampling, and mteb's own classifier and clustering experiments
    oracle: bool | None = None  # the response-oracle baseline (see above); None: when `baselines` is on
    # Where the oracle's answers are cached, by content (like the generate stage); unset: <run_dir>/oracle in
    # workflows.run, runs/oracle from workflows.evaluate.
    oracle_dir: str | None = None
    # The check stage's pre-flight: the teacher, the oracle and the training-free baselines on this many items (pairs,
    # test rows) of each of STS-B, SICK-R and Emotion (components/evaluation/oracle.py); 0 skips it.
    check_pairs: int = Field(100, ge=0)
    # The Ray actor that runs the evaluate and check stages (and the oracle): these resources, so that on a cluster it
    # lands on a GPU worker, not the driver's node. num_gpus unset: 1 when training.use_gpu, else 0. num_cpus unset:
    # Ray reserves 1 CPU, and a CPU-only evaluation computes with every core of its node, as the driver did before
    # the actor existed (Ray would otherwise pin torch to 1 thread: half the speed of the 2-core default job); set a
    # number to reserve, and compute with, that many.
    num_gpus: float | None = Field(None, ge=0)
    num_cpus: float | None = Field(None, ge=0)

    @property
    def with_oracle(self) -> bool:
        return self.baselines if self.oracle is None else self.oracle

    @property
    def size_label(self) -> str:
        """How the scores were measured: full size (comparable with MTEB) or the quick mode."""
        return "full size" if self.limit is None else f"quick mode (limit {self.limit})"


class ServingSpec(Section):
    """The Ray Serve application (serve/): where it listens, its replicas, and the limits it enforces per request.

    Limits are answered in OpenAI's error shape: more than max_inputs_per_request inputs, an input longer than
    max_input_tokens (unless the request sets truncate) or a body over max_payload_bytes is a 413; more than
    max_ongoing_requests requests held by one replica at once is a 429.
    """

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    num_replicas: int = Field(1, ge=1)
    # Autoscaling between num_replicas and max_replicas when set, aiming at target_ongoing_requests per replica.
    max_replicas: int | None = Field(None, ge=1)
    target_ongoing_requests: float = Field(16, gt=0)
    num_cpus: float = Field(1, gt=0)
    num_gpus: float = Field(0, ge=0)
    # The backbone's precision on the replicas; unset: the one the model was trained with. bfloat16 on a GPU
    # halves memory and time (the special rows and projections stay float32).
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    max_batch_size: int = Field(32, ge=1)  # texts collected across requests into one forward pass; 1 = no batching
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    max_batch_tokens: int = Field(8192, ge=1)  # padded tokens (rows x longest row, special tokens included) per pass
    # The fixed cost of one forward pass, in tokens: a collected batch of mixed lengths is split into passes of
    # similar lengths where the padding saved is worth more than this. Unset: 64 on a CPU (compute grows with
    # tokens); max_batch_tokens on a GPU, where a small model's pass costs its kernel launches, not its tokens,
    # so a batch is split only by the token budget.
    pass_cost_tokens: int | None = Field(None, ge=0)
    max_inputs_per_request: int = Field(256, ge=1)
    max_input_tokens: int = Field(512, ge=1)  # also capped by the model's own max_query_tokens
    max_payload_bytes: int = Field(1_000_000, ge=1)
    max_ongoing_requests: int = Field(64, ge=1)
    max_decode_tokens: int = Field(128, ge=1)  # the largest max_new_tokens POST /v1/decode accepts
    max_decode_inputs: int = Field(8, ge=1)  # generation is ~max_new_tokens passes per input, so fewer than embeddings
    served_model_name: str | None = None  # the `model` of requests and responses; default: the model folder's name
    api_key_env: str | None = None  # name of an env var holding a bearer token; when set, requests need it (401)

    @model_validator(mode="after")
    def _replica_range(self) -> ServingSpec:
        if self.max_replicas is not None and self.max_replicas < self.num_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) must be >= num_replicas ({self.num_replicas})")
        return self


class SearchDimension(Section):
    """One axis of a sweep: choice/grid over `values`, or uniform/loguniform over [low, high]."""

    kind: Literal["choice", "grid", "uniform", "loguniform"]
    values: list[Any] | None = None
    low: float | None = None
    high: float | None = None

    @model_validator(mode="after")
    def _complete(self) -> SearchDimension:
        if self.kind in ("choice", "grid"):
            if not self.values:
                raise ValueError(f"kind '{self.kind}' needs a non-empty values list")
        elif self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"kind '{self.kind}' needs low < high")
        elif self.kind == "loguniform" and self.low <= 0:
            raise ValueError("kind 'loguniform' needs low > 0")
        return self


class SweepSpec(Section):
    """A Ray Tune search over any dotted spec keys; trials share the generate and teach stages."""

    space: dict[str, SearchDimension]
    metric: str = "holdout_reconstruction_loss"
    mode: Literal["min", "max"] = "min"
    num_trials: int = Field(4, ge=1)  # samples per grid point
    max_concurrent: int = Field(1, ge=1)
    asha: bool = True  # stop poor trials early
    grace_period: int = Field(1, ge=1)  # reports before ASHA may stop a trial
    reduction_factor: int = Field(2, ge=2)


class Spec(Section):
    """A whole run: what to train, on what, how, and how to track, evaluate and serve it."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    description: str = ""
    # Where every stage writes: default runs/<name>; on a cluster an absolute path that every node mounts, or a URI
    # (s3://bucket/prefix, gs://..., abfs://...; S3 endpoint and keys from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...).
    output_dir: str | None = None
    backbone: BackboneSpec
    teacher: TeacherSpec
    tokens: TokensSpec = TokensSpec()
    loss: LossSpec = LossSpec()
    model: ModelSpec = ModelSpec()
    data: DataSpec = DataSpec()
    generation: GenerationSpec = GenerationSpec()
    training: TrainingSpec = TrainingSpec()
    tracking: TrackingSpec = TrackingSpec()
    evaluation: EvaluationSpec = EvaluationSpec()
    serving: ServingSpec = ServingSpec()
    sweep: SweepSpec | None = None

    @model_validator(mode="after")
    def _sweep_keys_exist(self) -> Spec:
        for key in self.sweep.space if self.sweep else ():
            parts = key.split(".")
            if parts[0] == "sweep" or parts[-1] not in _fields_at(Spec, parts[:-1]):
                raise ValueError(f"sweep.space: '{key}' is not a spec key")
        return self

    @property
    def run_dir(self) -> Path | RemotePath:
        """A local folder (a Path, as before) or shared storage (a RemotePath for s3://, gs://, abfs://, ...):
        components/storage.py decides which, so no stage tests a scheme itself."""
        from components.storage import location

        return location(self.output_dir or f"runs/{self.name}")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_pinned_dict(self) -> dict[str, Any]:
        """to_dict with the run folder made absolute, for processes that Ray starts in their own working directory
        (Ray Train workers, Tune trials), where a relative run folder would resolve somewhere else."""
        return self.to_dict() | {"output_dir": str(self.run_dir.resolve())}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def fingerprint(self, *sections: str) -> str:
        """A stable hash of the named sections (all when none are named), for caching stage outputs."""
        data = self.to_dict()
        chosen = {key: data[key] for key in sections} if sections else data
        return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- loading


def load_spec(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Spec:
    """Read a spec file, resolve its `base:` chain, apply `key=value` overrides, and validate."""
    data = _read_with_bases(Path(path), chain=())
    for override in overrides:
        _apply_override(data, override)
    return validate_spec(data, source=str(path))


def validate_spec(data: Any, source: str = "<spec>") -> Spec:
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a spec must be a mapping of sections, got {type(data).__name__}")
    try:
        return Spec.model_validate(data)
    except ValidationError as err:
        lines = [_describe(error) for error in err.errors()]
        raise SpecError(f"{source}: invalid spec\n" + "\n".join(f"  - {line}" for line in lines)) from None


def _read_with_bases(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain, resolved))
        raise SpecError(f"{path}: base specs form a cycle: {cycle}")
    if not path.is_file():
        hint = f" (named as base by {chain[-1]})" if chain else ""
        raise SpecError(f"{path}: spec file not found{hint}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError(f"{path}:{where}: not valid YAML: {getattr(err, 'problem', err)}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: a spec must be a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise SpecError(f"{path}: base: expected a file path, got {type(base).__name__}")
    parent = _read_with_bases(path.parent / base, chain=(*chain, resolved))
    return _deep_merge(parent, data)


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Mappings merge key by key; anything else (lists included) is replaced whole."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _apply_override(data: dict[str, Any], override: str) -> None:
    """Set one dotted key (list items by index: data.sources[0].path) to a YAML-parsed value."""
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise SpecError(f"--set {override!r}: expected dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    steps: list[str | int] = []
    for part in key.strip().split("."):
        match = re.fullmatch(r"([^\[\]]+)((?:\[\d+\])*)", part)
        if not match:
            raise SpecError(f"--set {override!r}: cannot parse key part {part!r}")
        steps.append(match.group(1))
        steps += [int(index) for index in re.findall(r"\[(\d+)\]", match.group(2))]
    node: Any = data
    for depth, step in enumerate(steps[:-1]):
        where = _format_path(steps[: depth + 1])
        if isinstance(step, int):
            if not isinstance(node, list) or step >= len(node):
                raise SpecError(f"--set {override!r}: {where} does not exist")
            node = node[step]
            continue
        if not isinstance(node, dict):
            raise SpecError(f"--set {override!r}: {_format_path(steps[:depth])} is not a section")
        if node.get(step) is None:
            node[step] = [] if isinstance(steps[depth + 1], int) else {}
        node = node[step]
    last = steps[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or last >= len(node):
            raise SpecError(f"--set {override!r}: {_format_path(steps)} does not exist")
    elif not isinstance(node, dict):
        raise SpecError(f"--set {override!r}: {_format_path(steps[:-1])} is not a section")
    node[last] = value


# ------------------------------------------------------------------------------------------ error messages

_TYPE_WORDS = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}


def _describe(error: dict[str, Any]) -> str:
    loc = [part for part in error["loc"] if not _is_union_tag(part)]
    path = _format_path(loc)
    kind = error["type"]
    if kind == "extra_forbidden":
        parent_fields = _fields_at(Spec, loc[:-1])
        hint = ""
        if parent_fields:
            close = difflib.get_close_matches(str(loc[-1]), parent_fields, n=1, cutoff=0.5)
            if close:
                hint = f"; did you mean '{_format_path([*loc[:-1], close[0]])}'?"
            else:
                hint = f"; valid keys here: {', '.join(parent_fields)}"
        return f"{path}: unknown key{hint}"
    if kind == "missing":
        return f"{path}: required key is missing"
    got = _show_input(error.get("input"))
    if kind in _TYPE_WORDS:
        return f"{path}: expected {_TYPE_WORDS[kind]}, got {got}"
    if kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        return f"{path}: must be one of {expected}, got {got}"
    message = error["msg"].removeprefix("Value error, ").replace("Input should be", "must be")
    if not loc:  # a rule across sections: its message names the keys
        return message
    if isinstance(error.get("input"), dict):  # a whole section failed a cross-field rule: the message says why
        return f"{path}: {message}"
    return f"{path}: {message} (got {got})"


def _is_union_tag(part: Any) -> bool:
    # pydantic adds the chosen branch of a union ("int", "function-after[...]") to the location
    return isinstance(part, str) and (
        re.fullmatch(r"[\w-]+\[.*[(,].*\]", part) is not None or part in {"int", "str", "float", "bool", "none"}
    )


def _format_path(loc: list[Any]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "<top level>"


def _show_input(value: Any) -> str:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return f"{shown} ({type(value).__name__})"


def _fields_at(model: type[BaseModel], loc: list[Any]) -> list[str]:
    """The valid keys of the section at `loc` (walking through lists, optionals and dicts)."""
    current: Any = model
    for part in loc:
        current = _unwrap(current)
        if isinstance(part, int):
            args = typing.get_args(current)
            current = args[0] if args else None
        elif isinstance(current, type) and issubclass(current, BaseModel) and part in current.model_fields:
            current = current.model_fields[part].annotation
        else:
            return []
    current = _unwrap(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _unwrap(annotation: Any) -> Any:
    """`X | None` -> X."""
    args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return annotation
