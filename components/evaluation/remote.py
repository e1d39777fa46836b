"""Where evaluation runs: in a Ray actor with the spec's evaluation resources, never in the driver.

On a cluster the driver runs on the head node (no GPU in ray_cluster.yaml); whatever loads a model must run where
the spec's resources are. `on_evaluation_worker(spec, function, *args)` starts one actor with
`evaluation.num_cpus` / `evaluation.num_gpus` (unset: a GPU when training used one), runs `function(*args)` there
and returns its result with where it ran: {"node_id", "device", "hostname"} (the evaluate stage adds "dtype": the
model is evaluated on the actor's device in the training precision). Without Ray initialised (the
evaluate command, the check stage on one machine) it runs in this process, as before.

`evaluate_on_worker` is the evaluate stage's use of it: the report is written into the actor's local scratch folder
and copied to the run's storage (a local folder or s3://..., components/storage.py); the driver only reads scores.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def evaluation_resources(spec: Any) -> dict[str, float]:
    evaluation = spec.evaluation
    gpus = evaluation.num_gpus if evaluation.num_gpus is not None else (1 if spec.training.use_gpu else 0)
    return {"num_cpus": 1 if evaluation.num_cpus is None else evaluation.num_cpus, "num_gpus": gpus}


def torch_threads(num_cpus: float | None, gpus: float) -> int | None:
    """Threads for torch in the evaluation actor: the spec's num_cpus, or (unset, no GPU) every core of the node.

    None leaves torch as it is (a GPU evaluation needs no CPU threads beyond Ray's default)."""
    if num_cpus is not None:
        return max(1, int(num_cpus))
    return None if gpus else len(os.sched_getaffinity(0))


def training_dtype(spec: Any) -> str:
    """The backbone's precision during training (components/precision.py): evaluation measures what was trained."""
    from components.precision import training_backbone

    return training_backbone(spec.backbone, spec.training).dtype


def placement(gpus: float) -> dict[str, Any]:
    """Which node and device this process evaluates on (recorded in the results)."""
    import torch

    node_id = None
    try:
        import ray

        if ray.is_initialized():
            node_id = ray.get_runtime_context().get_node_id()
    except Exception:  # not under Ray: the node is this process's machine
        node_id = None
    device = "cuda" if gpus and torch.cuda.is_available() else "cpu"
    return {"node_id": node_id, "device": device, "hostname": os.uname().nodename}


class EvaluationWorker:
    """The actor: one call, then the driver kills it (its model memory goes with it)."""

    def __init__(self, gpus: float, threads: int | None):
        import torch

        self.gpus = gpus
        # The progress lines of long encodes (components/evaluation/progress.py) are INFO logs: an actor's root logger
        # drops them unless configured, as workflows.run configures the driver's.
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        if threads:
            torch.set_num_threads(threads)

    def run(self, function: Callable, args: tuple, kwargs: dict) -> tuple[Any, dict[str, Any]]:
        return function(*args, **kwargs), placement(self.gpus)


def on_evaluation_worker(spec: Any, function: Callable, *args: Any, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """(function(*args, **kwargs), where it ran): in an actor with the spec's evaluation resources when Ray is up."""
    import ray

    resources = evaluation_resources(spec)
    if not ray.is_initialized():
        return function(*args, **kwargs), placement(resources["num_gpus"])
    threads = torch_threads(spec.evaluation.num_cpus, resources["num_gpus"])
    actor = ray.remote(**resources)(EvaluationWorker).remote(resources["num_gpus"], threads)
    try:
        result, where = ray.get(actor.run.remote(function, args, kwargs))
    finally:
        ray.kill(actor)
    log.info("evaluation ran on node %s (%s)", where["node_id"], where["device"])
    return result, where


def _evaluate_into(output: str, model_ref: str, kwargs: dict[str, Any], where: dict[str, Any]) -> dict[str, Any]:
    """In the actor: run_evaluation into a local scratch folder, then copy the report to `output` (any storage)."""
    import json

    from components.storage import location, upload
    from workflows.evaluate import run_evaluation

    target = location(output)
    with tempfile.TemporaryDirectory() as scratch:
        # A local folder is written in place (a stopped run keeps the models it finished); shared storage by copy.
        local = target if isinstance(target, Path) else Path(scratch) / "report"
        device = placement(where.get("num_gpus", 0))["device"]  # the actor's GPU when it was given one
        report = run_evaluation(model_ref, output=local, device=device, **kwargs)
        # Where it ran, beside the scores (the driver checks it; a cluster user sees which node did the work).
        results = json.loads((local / "results.json").read_text())
        results["placement"] = where | placement(where.get("num_gpus", 0))
        (local / "results.json").write_text(json.dumps(results, indent=2))
        if local != target:
            upload(local, target)
    report["placement"] = results["placement"]
    report["paths"] = {kind: str(target / Path(path).name) for kind, path in report["paths"].items()}
    return report


def evaluate_on_worker(spec: Any, model_ref: str, output: Any, **kwargs: Any) -> dict[str, Any]:
    """workflows.evaluate.run_evaluation(model_ref, output=output, **kwargs) on the evaluation actor."""
    resources = evaluation_resources(spec)
    kwargs.setdefault("dtype", training_dtype(spec))
    where = {"dtype": kwargs["dtype"], "num_gpus": resources["num_gpus"], "num_cpus": resources["num_cpus"]}
    report, _ = on_evaluation_worker(spec, _evaluate_into, str(output), str(model_ref), kwargs, where)
    return report
