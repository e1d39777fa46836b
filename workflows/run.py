"""The main job: run the stages of a spec in order.

    python -m workflows.run SPEC [--set key=value ...] [--stages check,generate,teacher,teach,train,evaluate] [--dry-run] [--print-spec]

check (load the backbone, build the model, and the pre-flight: can distillation from this backbone and teacher beat
the backbone's training-free baselines? components/evaluation/oracle.py; it runs again on a rerun, from the
cached answers) -> generate (the frozen LLM answers the queries) -> teacher (with teacher.train only: an LLM2Vec
teacher trained from the backbone, workflows/teacher.py) -> teach (the teacher embeds the answers) -> train (Ray Train +
DeepSpeed; MLflow run and registered model) -> evaluate (the spec's evaluation suite; scores into the same MLflow
run; `evaluation.suite: none` skips it). Each stage is skipped when its output exists for the same
inputs, so a rerun after a failure continues where it stopped. Connects to the cluster in RAY_ADDRESS (as under
`ray job submit`), else starts a local Ray on loopback. A bad spec exits with status 2 and a message naming the
key; a failing stage exits with status 1 and names the stage.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from components.spec import Spec
from workflows._cli import add_spec_arguments, spec_from_args

log = logging.getLogger("workflows.run")


def stage_check(spec: Spec, _results: dict[str, Any]) -> dict[str, Any]:
    """Load the backbone, build the (untrained) model, and encode and decode a few texts."""
    from components.backbone import load_backbone
    from components.model import LLM2VecGen
    from components.teacher import teacher_dimension

    started = time.perf_counter()
    backbone = load_backbone(spec.backbone)
    load_seconds = time.perf_counter() - started
    model = LLM2VecGen.from_spec(spec, embedding_dim=teacher_dimension(spec.teacher, backbone), backbone=backbone)
    texts = ["What is the capital of France?", "How do vaccines work?", "Write a haiku about autumn."]
    embeddings = model.encode(texts, normalize=True)
    decoded = model.decode(texts, max_new_tokens=16)
    print(f"backbone: {spec.backbone.source} {spec.backbone.name or spec.backbone.random} loaded in {load_seconds:.1f}s "
          f"(fingerprint {backbone.fingerprint[:12]})")
    print(f"model: {model.config.thought_tokens} thought + {model.config.compression_tokens} compression tokens, "
          f"hidden {model.config.hidden_size}, embedding dim {model.config.embedding_dim}, "
          f"{sum(p.numel() for p in model.trainable_parameters()):,} trainable parameters")
    for text, vector, words in zip(texts, embeddings, decoded, strict=True):
        print(f"  {text!r}: |e|={float((vector**2).sum()) ** 0.5:.3f} e[:3]={vector[:3].round(3).tolist()} decodes to {words!r}")
    return {"backbone_load_s": load_seconds, "embedding_dim": model.config.embedding_dim,
            "oracle": check_oracle(spec, backbone)}


# The local datasets the pre-flight reads (components/evaluation/oracle.py CHECK_TASKS).
CHECK_DATA = ("stsbenchmark", "sick", "emotion")


def check_oracle(spec: Spec, backbone: Any = None) -> dict[str, Any] | None:
    """Can this backbone and teacher pay? The pre-flight (issues 18, 25): the teacher, the response oracle and the
    backbone's training-free baselines on a small sample, and whether distillation can beat the best baseline."""
    data = Path(spec.evaluation.data_dir)
    missing = [name for name in CHECK_DATA if not (data / name).is_dir()]
    if not spec.evaluation.check_pairs or missing:
        why = "evaluation.check_pairs is 0" if not spec.evaluation.check_pairs else f"no {', '.join(missing)} in {data}"
        print(f"pre-flight: skipped ({why})", flush=True)
        return None
    from workflows.evaluate import go_offline

    go_offline()
    from components.evaluation.oracle import check_oracle as run_check

    return run_check(spec, backbone=backbone)


def stage_generate(spec: Spec, _results: dict[str, Any]) -> dict[str, Any]:
    from workflows.generate import run_generate

    return {"responses": str(run_generate(spec))}


def stage_teacher(spec: Spec, results: dict[str, Any]) -> dict[str, Any]:
    """With teacher.train: train an LLM2Vec teacher from the backbone (workflows/teacher.py); else nothing to do."""
    if spec.teacher.train is None:
        return {}
    from workflows.teacher import run_teacher

    return run_teacher(spec, results.get("generate", {}).get("responses"))


def stage_teach(spec: Spec, results: dict[str, Any]) -> dict[str, Any]:
    from workflows.generate import run_teach

    responses = results.get("generate", {}).get("responses")
    return {"targets": str(run_teach(spec, responses))}


def stage_train(spec: Spec, results: dict[str, Any]) -> dict[str, Any]:
    from workflows.generate import run_teach
    from workflows.train import run_train, training_data

    targets = results.get("teach", {}).get("targets") or run_teach(spec)
    data = training_data(spec, targets)  # an Arrow file the workers memory-map, not rows in memory
    return run_train(spec, data, embedding_dim=data.dimension, rows_fingerprint=data.fingerprint)


def stage_evaluate(spec: Spec, results: dict[str, Any]) -> dict[str, Any]:
    from workflows.evaluate import stage_evaluate as evaluate

    return evaluate(spec, results)


STAGES: dict[str, Callable[[Spec, dict[str, Any]], Any]] = {
    "check": stage_check,
    "generate": stage_generate,
    "teacher": stage_teacher,
    "teach": stage_teach,
    "train": stage_train,
    "evaluate": stage_evaluate,
}
# check first: the pre-flight says whether training can pay before any of it is spent (issue 25).
DEFAULT_STAGES = ["check", "generate", "teacher", "teach", "train", "evaluate"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m workflows.run", description=__doc__.split("\n\n")[0])
    add_spec_arguments(parser)
    parser.add_argument("--stages", default=",".join(DEFAULT_STAGES), help=f"comma-separated, from: {', '.join(STAGES)}")
    parser.add_argument("--dry-run", action="store_true", help="validate the spec and exit")
    parser.add_argument("--print-spec", action="store_true", help="print the fully resolved spec")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spec = spec_from_args(args)
    if spec is None:
        return 2
    if args.print_spec:
        print(spec.to_yaml(), end="")
    if args.dry_run:
        print(f"spec OK: {args.spec} (name {spec.name}, fingerprint {spec.fingerprint()})")
        return 0
    if args.print_spec:
        return 0
    stages = [name.strip() for name in args.stages.split(",") if name.strip()]
    unknown = [name for name in stages if name not in STAGES]
    if unknown:
        print(f"error: --stages: unknown stage(s) {', '.join(unknown)}; known: {', '.join(STAGES)}", file=sys.stderr)
        return 2
    if "evaluate" in stages:  # a suite that needs the hub fails now, not after training
        from workflows.evaluate import preflight

        problem = preflight(spec.evaluation)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    _connect_ray(stages)
    results: dict[str, Any] = {}
    timings: dict[str, float] = {}
    for name in stages:
        print(f"== stage {name}", flush=True)
        started = time.perf_counter()
        try:
            if spec.teacher.train is not None and name in ("teach", "train", "evaluate"):
                from workflows.teacher import trained_teacher_spec  # the teacher stage's folder becomes teacher.name

                spec = trained_teacher_spec(spec, results.get("generate", {}).get("responses"))
            results[name] = STAGES[name](spec, results)
        except Exception as err:  # any failure is reported with its stage; the exit code says so
            log.exception("stage %s failed", name)
            print(f"error: stage '{name}' failed: {type(err).__name__}: {err}", file=sys.stderr)
            return 1
        timings[name] = time.perf_counter() - started
        print(f"== stage {name} done in {timings[name]:.1f}s", flush=True)
    print(summary(spec, results, timings))
    return 0


def _connect_ray(stages: list[str]) -> None:
    if stages == ["check"]:
        return
    # Loopback only on a local machine (see README); RAY_ADDRESS, set by `ray job submit`, wins when present.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    from components.ray_env import connect

    if not ray.is_initialized():
        connect(log_to_driver=True)  # the hub token and cache location reach every worker (components/ray_env.py)


def summary(spec: Spec, results: dict[str, Any], timings: dict[str, float]) -> str:
    lines = [f"== summary of {spec.name}"]
    train = results.get("train") or {}
    for label, key in [("model", "model_dir"), ("registered", "model_uri"), ("mlflow run", "mlflow_run_id"),
                       ("mlflow store", "mlflow_tracking_uri")]:
        if train.get(key):
            lines.append(f"  {label:<12} {train[key]}")
    if train.get("mlflow_tracking_uri"):
        lines.append(f"  open with:   mlflow ui --backend-store-uri {train['mlflow_tracking_uri']}")
    verdict = ((results.get("check") or {}).get("oracle") or {}).get("verdict")
    if verdict:  # the pre-flight's answer to "can distillation beat the training-free baselines here?"
        lines.append(f"  {verdict}")
    evaluate = results.get("evaluate") or {}
    if evaluate.get("evaluation"):  # which evaluation ran (or why none did)
        lines.append(f"  evaluation   {evaluate['evaluation']}")
    report = evaluate.get("report")
    if report:
        lines.append(f"  report       {report}")
        # The score table itself (tasks x models), as the report has it.
        table = [line for line in Path(report).read_text().splitlines() if line.startswith("|")]
        lines += [f"  {line}" for line in table]
    lines.append("  stage        seconds")
    lines += [f"  {name:<12} {seconds:8.1f}" for name, seconds in timings.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
