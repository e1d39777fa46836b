"""What the local suite costs a model on this machine, per task, at full size and in the quick mode.

    python -m benchmarks.evaluation_cost [MODEL_FOLDER | --spec SPEC] [--limits 300,500] [--sample 24] [--oracle-sample 16]
                                         [--output runs/benchmarks/evaluation_cost.json]

1. Counts what mteb asks to encode for each local task at full size and at `--limit` (texts and characters), by
   running each task on an embedder that returns random unit vectors (mteb's own loaders and evaluators, no model).
2. Times the model (an LLM2Vec-Gen folder, or an untrained one built from --spec: the same cost) on `--sample`
   texts drawn from each task's quick-mode texts, with their prompts, and gives seconds per character.
3. Times the response oracle's generation (the backbone's greedy answers, the spec's max_new_tokens) on
   `--oracle-sample` texts, and gives seconds per text.
Estimates = measured rate x counted characters (or texts); they are printed next to what was counted, never passed
off as a measured run. mteb's classifiers and k-means add seconds on top (small next to a 135M model's encoding).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


class Recorder:
    """An embedder that records what it is asked to encode and answers random unit vectors."""

    name, dimension = "recorder", 32

    def __init__(self):
        self.prompts: dict[str, str] = {}
        self.calls: list[tuple[str, list[str]]] = []
        self.rng = np.random.default_rng(0)

    def embed(self, texts, prompt, batch_size):
        self.calls.append((prompt, list(texts)))
        vectors = self.rng.standard_normal((len(texts), self.dimension)).astype(np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def count_texts(tasks: list[str], evaluation, prompts: dict[str, str]) -> dict[str, dict]:
    from components.evaluation.runner import evaluate_embedder

    counts = {}
    for task in tasks:
        recorder = Recorder()
        recorder.prompts = dict(prompts)
        evaluate_embedder(recorder, [task], evaluation)
        texts = [(prompt, text) for prompt, batch in recorder.calls for text in batch if text.strip()]
        counts[task] = {"texts": len(texts), "chars": sum(len(p) + len(t) for p, t in texts), "sample_pool": texts}
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.evaluation_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", help="an LLM2Vec-Gen model folder (default: untrained, from --spec)")
    parser.add_argument("--spec", default="specs/smollm2-135m.yaml")
    parser.add_argument("--limits", default="300", help="comma-separated quick limits to count (the first is sampled)")
    parser.add_argument("--sample", type=int, default=24)
    parser.add_argument("--oracle-sample", type=int, default=16)
    parser.add_argument("--tasks", help="comma-separated local tasks (default: the local suite)")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--output", type=Path, default=Path("runs/benchmarks/evaluation_cost.json"))
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)

    from components.evaluation.encoders import GenEmbedder
    from components.evaluation.oracle import AnswerCache
    from components.evaluation.suites import LOCAL_TASKS
    from components.model import LLM2VecGen
    from components.spec import EvaluationSpec, load_spec

    spec = load_spec(args.spec)
    tasks = args.tasks.split(",") if args.tasks else LOCAL_TASKS
    if args.model:
        model = LLM2VecGen.load(args.model)
    else:
        from components.teacher import teacher_dimension

        model = LLM2VecGen.from_spec(spec, embedding_dim=teacher_dimension(spec.teacher, spec.backbone))
    embedder = GenEmbedder(model)
    full = count_texts(tasks, EvaluationSpec(data_dir=args.data_dir), embedder.prompts)
    limits = [int(limit) for limit in args.limits.split(",")]
    quicks = {limit: count_texts(tasks, EvaluationSpec(data_dir=args.data_dir, limit=limit), embedder.prompts) for limit in limits}
    quick = quicks[limits[0]]

    rng = np.random.default_rng(0)
    report = {"model": args.model or f"untrained, from {args.spec}", "limits": limits, "tasks": {}}
    for task in tasks:
        pool = quick[task]["sample_pool"]
        picked = [pool[i] for i in sorted(rng.choice(len(pool), size=min(args.sample, len(pool)), replace=False))]
        started = time.perf_counter()
        for prompt in dict.fromkeys(p for p, _ in picked):
            embedder.embed([t for p, t in picked if p == prompt], prompt, 8)
        seconds = time.perf_counter() - started
        rate = seconds / max(1, sum(len(p) + len(t) for p, t in picked))
        report["tasks"][task] = {
            "full_texts": full[task]["texts"], "full_chars": full[task]["chars"],
            "quick_texts": quick[task]["texts"], "quick_chars": quick[task]["chars"],
            "sample_texts": len(picked), "sample_seconds": seconds, "seconds_per_char": rate,
            "full_seconds_estimate": rate * full[task]["chars"],
            **{f"quick{limit}_texts": quicks[limit][task]["texts"] for limit in limits},
            **{f"quick{limit}_seconds_estimate": rate * quicks[limit][task]["chars"] for limit in limits},
        }
        print(f"{task}: full {full[task]['texts']} texts -> ~{rate * full[task]['chars']:.0f}s; quick "
              f"{quick[task]['texts']} texts -> ~{rate * quick[task]['chars']:.0f}s ({len(picked)} timed in {seconds:.1f}s)",
              flush=True)

    if args.oracle_sample:
        sts = [t for p, t in quick[tasks[0]]["sample_pool"]][: args.oracle_sample]
        with tempfile.TemporaryDirectory() as folder:  # never cached: every answer is generated
            cache = AnswerCache(folder, model.config.backbone, spec.generation)
            cache.worker()  # the backbone's load is not part of the per-answer cost
            started = time.perf_counter()
            cache.answers(sts)
            per_text = (time.perf_counter() - started) / max(1, len(sts))
        report["oracle"] = {"sample_texts": len(sts), "seconds_per_text": per_text,
                            "max_new_tokens": spec.generation.max_new_tokens,
                            "full_texts": sum(t["full_texts"] for t in report["tasks"].values()),
                            **{f"quick{limit}_texts": sum(t[f"quick{limit}_texts"] for t in report["tasks"].values()) for limit in limits}}
        report["oracle"]["full_seconds_estimate"] = per_text * report["oracle"]["full_texts"]
        for limit in limits:
            report["oracle"][f"quick{limit}_seconds_estimate"] = per_text * report["oracle"][f"quick{limit}_texts"]
        print(f"oracle: {per_text:.2f}s per answer -> full ~{report['oracle']['full_seconds_estimate'] / 3600:.1f} h, "
              + ", ".join(f"limit {limit} ~{report['oracle'][f'quick{limit}_seconds_estimate'] / 60:.0f} min" for limit in limits),
              flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
