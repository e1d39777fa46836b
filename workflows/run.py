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

--output-dir (the spec's output_dir) puts every stage's output on shared storage: an absolute path every node mounts
or a URI (s3://, gs://, abfs://; components/storage.py). Before the first stage the run's storage is checked, and
what cannot work is refused with one line naming the fix (exit status 2): a relative output_dir under
`ray job submit --working-dir`, a folder the cluster's nodes do not share, storage that cannot be reached, or a
SQLite MLflow store on a cluster. The check and evaluate stages run in a Ray actor with evaluation.num_cpus /
num_gpus (components/evaluation/remote.py); the driver only collects their results.
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
# A cluster's run storage (set on the head by ray_cluster.yaml): runs of specs without output_dir go to <it>/<name>.
OUTPUT_DIR_ENV = "LLM2VEC_GEN_OUTPUT_DIR"


def stage_check(spec: Spec, _results: dict[str, Any]) -> dict[str, Any]:
    """check_model on the evaluation actor (components/evaluation/remote.py): where the model would be evaluated."""
    from components.evaluation.remote import on_evaluation_worker

    result, where = on_evaluation_worker(spec, check_model, spec)
    return result | {"placement": where}


def check_model(spec: Spec) -> dict[str, Any]:
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
    parser.add_argument("--output-dir", help="the spec's output_dir: an absolute path every node mounts, or a URI "
                        "(s3://bucket/prefix, gs://..., abfs://...) for a run on a cluster")
    parser.add_argument("--dry-run", action="store_true", help="validate the spec and exit")
    parser.add_argument("--print-spec", action="store_true", help="print the fully resolved spec")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.output_dir:
        args.set = [*args.set, f"output_dir={args.output_dir}"]
    spec = spec_from_args(args)
    if spec is None:
        return 2
    if spec.output_dir is None and os.environ.get(OUTPUT_DIR_ENV):  # the cluster's run storage (ray_cluster.yaml)
        spec = spec.model_copy(update={"output_dir": f"{os.environ[OUTPUT_DIR_ENV].rstrip('/')}/{spec.name}"})
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
    from components.storage import StorageError, check_reachable

    try:  # before Ray starts: unreachable storage is refused in seconds
        check_reachable(spec.run_dir)
    except StorageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    _connect_ray(stages)
    problem = storage_problem(spec, stages)  # before the first stage: nothing is written when the run cannot work
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
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


def storage_problem(spec: Spec, stages: list[str]) -> str | None:
    """One line naming what cannot work about where this run writes, and the fix; None when it can run."""
    from components.storage import RemotePath, StorageError, check_reachable, check_shared, working_dir_problem
    from components.tracking import local_store, tracking_uri

    run_dir = spec.run_dir
    working_dir = None
    nodes: list[str] = []
    try:
        import ray

        if ray.is_initialized():
            working_dir = ray.get_runtime_context().runtime_env.get("working_dir")
            nodes = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
    except ImportError:
        pass
    if working_dir is None and os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):  # a job's driver, as Ray starts it
        import json

        job_config = json.loads(os.environ["RAY_JOB_CONFIG_JSON_ENV_VAR"])
        working_dir = (job_config.get("runtime_env") or {}).get("working_dir")
    problem = working_dir_problem(spec.output_dir, run_dir, working_dir)
    if problem:
        return problem
    remote = isinstance(run_dir, RemotePath)
    if remote and spec.teacher.train is not None:
        return (f"output_dir {run_dir}: the teacher stage (teacher.train) still writes a local folder; train the teacher "
                "with an output_dir that every node mounts, then name its folder in teacher.name")
    try:
        check_reachable(run_dir)  # (again: cheap, and storage_problem stands alone)
        check_shared(run_dir, nodes)
    except StorageError as err:
        return str(err)
    uri = tracking_uri(spec)
    tracked = spec.tracking.enabled and "train" in stages
    if tracked and (remote or len(nodes) > 1) and (uri == local_store(spec) or uri.startswith(("sqlite:", "file:"))):
        where = f"output_dir {run_dir} is not a local folder" if remote else f"the cluster has {len(nodes)} nodes"
        return (f"tracking: {where}, so MLflow needs a tracking server, not the SQLite store {uri}: set "
                "MLFLOW_TRACKING_URI or tracking.tracking_uri (ray_cluster.yaml starts one on the head)")
    return None


def _connect_ray(stages: list[str]) -> None:
    if stages == ["check"] and not os.environ.get("RAY_ADDRESS"):
        return  # one machine: the check runs in this process; under a job it runs on the evaluation actor
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
        from components.storage import location

        table = [line for line in location(report).read_text().splitlines() if line.startswith("|")]
        lines += [f"  {line}" for line in table]
    lines.append("  stage        seconds")
    lines += [f"  {name:<12} {seconds:8.1f}" for name, seconds in timings.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
