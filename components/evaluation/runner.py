"""Running a set of models on a set of tasks with mteb.evaluate, collecting each task's main score."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import mteb
from mteb.abstasks import AbsTask

from components.evaluation.advbench import HUB_TASK_CLASSES
from components.evaluation.encoders import MtebEncoder, TextEmbedder
from components.evaluation.safety import AdvBenchIR
from components.evaluation.suites import LOCAL_TASKS, LOWER_IS_BETTER
from components.evaluation.tasks import (
    LocalBanking77,
    LocalEmotion,
    LocalMRPC,
    LocalSciFact,
    LocalSICKR,
    LocalStackOverflowClustering,
    LocalSTSBenchmark,
    LocalTask,
    LocalTrecQA,
)
from components.spec import EvaluationSpec

log = logging.getLogger(__name__)

LOCAL_TASK_CLASSES: dict[str, type[LocalTask]] = {
    cls.metadata.name: cls
    for cls in (
        LocalSTSBenchmark, LocalSICKR, LocalBanking77, LocalEmotion, LocalStackOverflowClustering, LocalMRPC,
        LocalTrecQA, LocalSciFact, AdvBenchIR,
    )
}
assert list(LOCAL_TASK_CLASSES) == LOCAL_TASKS, "suites.LOCAL_TASKS lists the local task classes, in order"


@dataclass
class TaskScore:
    task: str
    type: str
    metric: str  # the task's main score
    score: float
    lower_is_better: bool
    seconds: float
    scores: dict[str, float] = field(default_factory=dict)  # every scalar score of the test split

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_tasks(names: list[str], evaluation: EvaluationSpec) -> list[AbsTask]:
    """Fresh task objects (mteb's clustering consumes its random state, so every model gets its own)."""
    tasks: list[AbsTask] = []
    for name in names:
        if name in LOCAL_TASK_CLASSES:
            tasks.append(
                LOCAL_TASK_CLASSES[name](
                    evaluation.data_dir, evaluation.limit, evaluation.distractors_per_query, evaluation.seed,
                    hard_negatives_per_query=evaluation.hard_negatives_per_query,
                )
            )
        else:
            if evaluation.limit is not None:
                log.warning("%s: a public MTEB task runs whole; --limit applies to local tasks only", name)
            # our own hub tasks (AdvBench-IR by the paper's protocol), else mteb's
            tasks.append(HUB_TASK_CLASSES[name](seed=evaluation.seed) if name in HUB_TASK_CLASSES else mteb.get_task(name))
    return tasks


def evaluate_embedder(
    embedder: TextEmbedder, task_names: list[str], evaluation: EvaluationSpec,
    prepare: Callable[[AbsTask], None] | None = None,
) -> dict[str, TaskScore]:
    """Main (and all scalar) scores of one model on the tasks, computed by mteb's own evaluators (`prepare(task)`,
    when given, adjusts each task object before it runs: the check stage's pre-flight trains fewer classifiers)."""
    encoder = MtebEncoder(embedder)
    scores: dict[str, TaskScore] = {}
    for task in build_tasks(task_names, evaluation):
        if prepare is not None:
            prepare(task)
        metadata, started = task.metadata, time.perf_counter()
        [task_result] = mteb.evaluate(  # one task at a time, so that a long run reports as it goes
            encoder,
            task,
            cache=None,  # never reuse or write ~/.cache/mteb: the same model name can mean a different folder
            encode_kwargs={"batch_size": evaluation.batch_size, "show_progress_bar": False},
            show_progress_bar=False,
            co2_tracker=False,
            overwrite_strategy="always",
        ).task_results
        scores[metadata.name] = TaskScore(
            task=metadata.name,
            type=str(metadata.type),
            metric=metadata.main_score,
            score=float(task_result.get_score()),  # the mean over subsets (languages) where a task has several
            lower_is_better=metadata.name in LOWER_IS_BETTER,
            seconds=time.perf_counter() - started,
            scores=scalar_scores(task_result.scores["test"][0]),
        )
        log.info("%s: %s %s = %.4f (%.0fs)", embedder.name, metadata.name, metadata.main_score,
                 scores[metadata.name].score, scores[metadata.name].seconds)
    return scores


def scalar_scores(scores: dict[str, Any]) -> dict[str, float]:
    """The finite scalar scores of a split, without mteb's nAUC calibration diagnostics (a dozen per k)."""
    return {
        key: float(value)
        for key, value in scores.items()
        if isinstance(value, int | float) and math.isfinite(value) and not key.startswith("nauc_")
    }


def evaluate_embedders(
    embedders: dict[str, TextEmbedder],
    task_names: list[str],
    evaluation: EvaluationSpec,
    after_each: Callable[[dict[str, dict[str, TaskScore]], dict[str, float]], None] | None = None,
    prepare: Callable[[AbsTask], None] | None = None,
) -> tuple[dict[str, dict[str, TaskScore]], dict[str, float]]:
    """({model label: {task: score}}, {model label: seconds}) for every model on the same tasks.

    `after_each(results so far, seconds so far)` runs after each model, so a long run can save what it has."""
    results, seconds = {}, {}
    for label, embedder in embedders.items():
        log.info("evaluating %s on %d tasks", label, len(task_names))
        started = time.perf_counter()
        results[label] = evaluate_embedder(embedder, task_names, evaluation, prepare)
        seconds[label] = time.perf_counter() - started
        log.info("%s done in %.0fs", label, seconds[label])
        if after_each:
            after_each(results, seconds)
    return results, seconds
