"""The response-oracle baseline: the teacher's embedding of the backbone's own answer to each evaluation text.

LLM2Vec-Gen distils teacher(answer of the frozen LLM to the input). A student that matched that target exactly would
score what this baseline scores, so it is the ceiling of the distillation (up to generalisation). When the oracle
scores below the teacher on the inputs themselves, answering costs more than it gives for that backbone and teacher
pair, and no training can make the student beat its teacher: a user sees it here before training.

    text --(the model's prompt for the task, as the model itself gets it)--> prompt + text
         --(the backbone's chat template, greedy, the spec's max_new_tokens/stop/system prompt)--> answer
         --(the teacher)--> vector

Answers are cached by content, like the generate stage: every list of texts mteb hands over becomes one
ShardedOutput folder (components/stages.py) keyed by the backbone, the decoding settings and the texts, written
shard by shard with the generate stage's worker (components/generation.py, run in this process: an evaluation is
one process). A rerun finds the folders complete and generates nothing; a run killed part-way redoes only the
missing shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from components.generation import ResponseGenerator, backbone_identity
from components.spec import BackboneSpec, GenerationSpec
from components.stages import ShardedOutput
from components.storage import location

log = logging.getLogger(__name__)

ORACLE_FORMAT = 1  # bump when the code changes what is cached for the same inputs


def greedy(generation: GenerationSpec) -> GenerationSpec:
    """The spec's generation settings, greedy: the oracle is the backbone's most likely answer."""
    return generation.model_copy(update={"do_sample": False})


class AnswerCache:
    """The backbone's answers to lists of queries, cached by content under `folder`."""

    def __init__(self, folder: str | Path, backbone: BackboneSpec, generation: GenerationSpec):
        self.folder = location(folder)  # a local folder or shared storage (components/storage.py)
        self.backbone = backbone
        self.generation = greedy(generation)
        self.generated = 0  # answers generated (not read from the cache) by this object
        self._identity: dict[str, Any] | None = None
        self._worker: ResponseGenerator | None = None

    def key_inputs(self, queries: Sequence[str]) -> dict[str, Any]:
        if self._identity is None:
            identity = backbone_identity(self.backbone)
            self._identity = {
                "backbone": self.backbone.model_dump(mode="json"),
                "backbone_fingerprint": identity.fingerprint,
                "chat_template_sha256": hashlib.sha256(identity.chat_template.encode()).hexdigest(),
            }
        decoding = self.generation.model_dump(
            mode="json", include={"backend", "max_new_tokens", "do_sample", "stop", "system_prompt", "enable_thinking"}
        )
        digest = hashlib.sha256(json.dumps(list(queries)).encode()).hexdigest()
        return {"stage": "oracle", "format": ORACLE_FORMAT, **self._identity, "decoding": decoding, "queries_sha256": digest}

    def answers(self, queries: Sequence[str]) -> list[str]:
        """The answer to each query, in order (each distinct query is generated once, and only if not cached)."""
        unique = list(dict.fromkeys(queries))
        if not unique:
            return []
        output = ShardedOutput.open(self.folder, self.key_inputs(unique), len(unique), self.generation.shard_size)
        if not output.complete:
            missing = output.missing_shards()
            log.info("oracle: %d answers to generate (%d of %d shards) into %s",
                     sum(len(output.shard_ids(s)) for s in missing), len(missing), output.num_shards, output.folder)
            started = time.perf_counter()
            table = pa.table({"id": list(range(len(unique))), "query": unique})
            for shard in missing:
                ids = output.shard_ids(shard)
                output.write_shard(shard, self.worker()(table.slice(ids.start, len(ids))))
                self.generated += len(ids)
            output.finish({"stage": "oracle", "seconds_last_run": round(time.perf_counter() - started, 1)})
        rows = output.read(columns=["query", "response"])
        by_query = dict(zip(rows.column("query").to_pylist(), rows.column("response").to_pylist(), strict=True))
        return [by_query[query] for query in queries]

    def worker(self) -> ResponseGenerator:
        """The generate stage's worker, loaded on first use; it would set torch's thread count to the actor's CPUs,
        which in this process would slow everything after it, so the count is put back."""
        if self._worker is None:
            threads = torch.get_num_threads()
            self._worker = ResponseGenerator(self.backbone, self.generation, seed=0)
            torch.set_num_threads(threads)
        return self._worker


class OracleEmbedder:
    """The teacher on the backbone's answer to `prompt + text` (the model's prompts: the texts are asked as the model
    is asked them)."""

    def __init__(self, cache: AnswerCache, teacher: Any, prompts: dict[str, str], name: str = "oracle"):
        self.cache = cache
        self.teacher = teacher
        self.name = name
        self.dimension = teacher.dimension
        self.prompts = dict(prompts)

    def embed(self, texts: list[str], prompt: str, batch_size: int) -> np.ndarray:
        return self.teacher.embed(self.cache.answers([prompt + text for text in texts]))


# The check stage's sample: two STS tasks, whose texts are short requests and statements (cheap to answer), scored
# on `evaluation.check_pairs` pairs each.
CHECK_TASKS = ["LocalSTSBenchmark", "LocalSICK-R"]


def check_oracle(spec: Any, teacher: Any = None) -> dict[str, Any]:
    """The oracle against the teacher on the inputs, on a small sample of the local STS tasks, before any training:
    {"teacher": {task: score}, "oracle": {task: score}, "seconds": ..., "answers_generated": ...}. Prints the table."""
    from components.evaluation.encoders import TeacherEmbedder
    from components.evaluation.report import markdown_table
    from components.evaluation.runner import evaluate_embedders
    from components.teacher import load_teacher

    evaluation = spec.evaluation.model_copy(update={"limit": spec.evaluation.check_pairs, "tasks": CHECK_TASKS})
    teacher = teacher or load_teacher(spec.teacher, spec.backbone)
    cache = AnswerCache(spec.evaluation.oracle_dir or spec.run_dir / "oracle", spec.backbone, spec.generation)
    embedders = {"teacher": TeacherEmbedder(teacher), "oracle": OracleEmbedder(cache, teacher, spec.model.prompts)}
    started = time.perf_counter()
    results, _ = evaluate_embedders(embedders, CHECK_TASKS, evaluation)
    seconds = time.perf_counter() - started
    print(f"response oracle vs teacher ({evaluation.size_label}: {evaluation.check_pairs} pairs per task, "
          f"{cache.generated} answers generated, {seconds:.0f}s):")
    print(markdown_table(results, size=evaluation.size_label), end="")
    teacher_mean = float(np.mean([score.score for score in results["teacher"].values()]))
    oracle_mean = float(np.mean([score.score for score in results["oracle"].values()]))
    verdict = ("the answers carry more than the inputs: distillation can pay" if oracle_mean > teacher_mean else
               "the answers embed WORSE than the inputs: a student distilled from them is unlikely to beat its teacher")
    print(f"oracle {100 * oracle_mean:.1f} vs teacher {100 * teacher_mean:.1f} on the inputs: {verdict}")
    return {"teacher": {task: s.score for task, s in results["teacher"].items()},
            "oracle": {task: s.score for task, s in results["oracle"].items()},
            "seconds": seconds, "answers_generated": cache.generated}
