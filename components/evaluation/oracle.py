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

from components.evaluation.progress import Progress
from components.generation import ResponseGenerator, backbone_identity
from components.spec import BackboneSpec, GenerationSpec
from components.stages import ShardedOutput
from components.storage import location

log = logging.getLogger(__name__)

ORACLE_FORMAT = 1  # bump when the code changes what is cached for the same inputs


def greedy(generation: GenerationSpec) -> GenerationSpec:
    """The spec's generation settings, greedy: the oracle is the backbone's most likely answer."""
    return generation.model_copy(update={"do_sample": False, "sampling": "spec"})


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
            progress = Progress("oracle: generate", sum(len(output.shard_ids(s)) for s in missing), unit="answers")
            for shard in missing:
                ids = output.shard_ids(shard)
                output.write_shard(shard, self.worker()(table.slice(ids.start, len(ids))))
                self.generated += len(ids)
                progress.update(len(ids))
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


# The check stage's pre-flight sample (issue 25): two STS tasks, whose texts are short requests and statements (cheap
# to answer), and one classification task (Emotion: 6 labels, so one classifier experiment trains on 96 tweets), each
# on `evaluation.check_pairs` items (pairs, or test rows).
CHECK_TASKS = ["LocalSTSBenchmark", "LocalSICK-R", "LocalEmotion"]
CHECK_EXPERIMENTS = 1  # mteb's classifier experiments in the pre-flight: each one adds its training texts to answer


def distillation_verdict(oracle: float, baselines: dict[str, float]) -> tuple[bool, str]:
    """Can distillation from this backbone and teacher beat the best training-free baseline of the backbone?

    `oracle`: the response oracle's mean score (the teacher on the backbone's own answers: what a student that
    matched its targets exactly would score); `baselines`: the training-free baselines' mean scores on the same
    tasks. A student is capped by the oracle (up to generalisation), so when the oracle is not above the best
    baseline no training can make it beat that baseline: (False, why). Otherwise (True, by how much it could)."""
    if not baselines:
        raise ValueError("distillation_verdict needs at least one training-free baseline score")
    best = max(baselines, key=lambda name: baselines[name])
    gap = 100 * (oracle - baselines[best])
    if gap <= 0:
        return False, (f"pre-flight: distillation CANNOT beat the training-free {best} here: the response oracle "
                       f"(the ceiling of distilling this teacher) scores {100 * oracle:.1f}, {-gap:.1f} points below "
                       f"{best}'s {100 * baselines[best]:.1f}; use {best}, or a larger backbone or another teacher")
    return True, (f"pre-flight: distillation can beat the training-free {best} here: the response oracle scores "
                  f"{100 * oracle:.1f}, {gap:.1f} points above {best}'s {100 * baselines[best]:.1f} (a student gets "
                  "there only if it matches its targets closely)")


def check_oracle(spec: Any, teacher: Any = None, backbone: Any = None) -> dict[str, Any]:
    """The pre-flight, before any training: on a small sample of local STS and classification tasks, the teacher on
    the inputs, the response oracle and the backbone's training-free baselines (those of evaluation.training_free:
    mean pooling, last token, PromptEOL plain and chat, Echo), and whether distillation can beat the best of those
    (distillation_verdict). Prints the table and the
    verdict; returns {"teacher": {task: score}, "oracle": ..., "<baseline>": ..., "best_baseline": name,
    "can_pay": bool, "verdict": line, "seconds": ..., "answers_generated": ...}."""
    from components.backbone import load_backbone
    from components.evaluation.encoders import BackboneReadouts, TeacherEmbedder, prompt_baselines
    from components.evaluation.report import markdown_table
    from components.evaluation.runner import evaluate_embedders
    from components.teacher import load_teacher

    evaluation = spec.evaluation.model_copy(update={"limit": spec.evaluation.check_pairs, "tasks": CHECK_TASKS})
    backbone = backbone or load_backbone(spec.backbone)
    teacher = teacher or load_teacher(spec.teacher, spec.backbone)
    cache = AnswerCache(spec.evaluation.oracle_dir or spec.run_dir / "oracle", spec.backbone, spec.generation)
    readouts = BackboneReadouts(backbone, max_tokens=spec.model.max_query_tokens)
    named = spec.evaluation.training_free  # the spec's training-free baselines (all five unless it names fewer)
    baselines = {name: readouts.embedder(pooling) for name, pooling in (("mean-pool", "mean"), ("last-token", "last"))
                 if name in named}
    baselines |= prompt_baselines(backbone, spec.model.max_query_tokens, named)
    embedders = {"teacher": TeacherEmbedder(teacher), "oracle": OracleEmbedder(cache, teacher, spec.model.prompts),
                 **baselines}
    started = time.perf_counter()
    results, _ = evaluate_embedders(embedders, CHECK_TASKS, evaluation, prepare=one_experiment)
    seconds = time.perf_counter() - started
    means = {name: float(np.mean([score.score for score in results[name].values()])) for name in results}
    can_pay, verdict = distillation_verdict(means["oracle"], {name: means[name] for name in baselines})
    print(f"pre-flight ({evaluation.size_label}: {evaluation.check_pairs} items per task, {cache.generated} answers "
          f"generated, {seconds:.0f}s): the teacher on the inputs, the response oracle (the teacher on the backbone's "
          "answers) and the backbone's training-free baselines:")
    print(markdown_table(results, size=evaluation.size_label), end="")
    print(f"oracle {100 * means['oracle']:.1f} vs teacher {100 * means['teacher']:.1f} on the inputs; "
          f"best training-free baseline: {max(baselines, key=lambda name: means[name])}")
    print(verdict, flush=True)
    return {**{name: {task: s.score for task, s in scores.items()} for name, scores in results.items()},
            "best_baseline": max(baselines, key=lambda name: means[name]), "can_pay": can_pay, "verdict": verdict,
            "seconds": seconds, "answers_generated": cache.generated}


def one_experiment(task: Any) -> None:
    """A classification task of the pre-flight trains CHECK_EXPERIMENTS classifiers (fewer training texts to answer)."""
    if hasattr(task, "n_experiments"):
        task.n_experiments = min(task.n_experiments, CHECK_EXPERIMENTS)
