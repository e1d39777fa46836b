"""Hyperparameter sweeps with Ray Tune: each trial builds and fits a TorchTrainer (Ray Train V2's pattern).

    python -m workflows.sweep SPEC [--set key=value ...]

The spec's `sweep:` section names a search space over dotted spec keys, the metric (by default the held-out
reconstruction loss: set data.holdout_fraction) and mode, the number of trials, concurrency and ASHA early
stopping. Generation and teacher targets are computed once and shared by every trial. Every trial is an
MLflow run under one parent run; the best trial's full spec is written to <run_dir>/sweep/best.yaml. Running
the same command again after an interruption resumes the sweep.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from components.spec import SearchDimension, Spec, SpecError, validate_spec
from workflows._cli import add_spec_arguments, spec_from_args

log = logging.getLogger("workflows.sweep")


def search_space(spec: Spec) -> dict[str, Any]:
    from ray import tune

    def dimension(axis: SearchDimension):
        if axis.kind == "choice":
            return tune.choice(axis.values)
        if axis.kind == "grid":
            return tune.grid_search(axis.values)
        if axis.kind == "uniform":
            return tune.uniform(axis.low, axis.high)
        return tune.loguniform(axis.low, axis.high)

    return {key: dimension(axis) for key, axis in spec.sweep.space.items()}


def trial_spec(spec: Spec, assignment: dict[str, Any]) -> Spec:
    """The base spec with one trial's values set at their dotted keys (validated like any spec)."""
    data = spec.to_dict()
    data.pop("sweep")
    for key, value in assignment.items():
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    suffix = "-".join(f"{key.split('.')[-1]}={value}" for key, value in sorted(assignment.items()))
    data["tracking"]["registered_model_name"] = None  # only the best trial deserves registering
    return validate_spec(data, source=f"sweep trial ({suffix})")


def run_trial(config: dict[str, Any], base: dict[str, Any], rows, dimension: int, fingerprint: str, parent_run_id: str | None):
    from ray.tune.integration.ray_train import TuneReportCallback

    from workflows.train import run_train

    spec = trial_spec(validate_spec(base, source="sweep"), config)
    run_train(spec, rows, dimension, fingerprint, callbacks=[TuneReportCallback()], parent_run_id=parent_run_id)


def run_sweep(spec: Spec) -> dict[str, Any]:
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from components.tracking import start_run
    from workflows.generate import run_teach
    from workflows.train import training_data

    if spec.sweep is None:
        raise SpecError("sweep: this spec has no sweep section")
    data = training_data(spec, run_teach(spec))  # one file shared by all trials; only its path travels
    rows, dimension, fingerprint = data, data.dimension, data.fingerprint
    sweep = spec.sweep
    folder = (spec.run_dir / "sweep").resolve()
    name = f"sweep-{spec.fingerprint()}"
    parent_run_id = None
    if spec.tracking.enabled:
        import mlflow

        id_file = folder / f"{name}.mlflow_run_id"
        previous = id_file.read_text().strip() if id_file.is_file() else None
        with start_run(spec, run_name=name, run_id=previous) as parent:
            parent_run_id = parent.info.run_id
            if previous is None:
                mlflow.log_text(spec.to_yaml(), "sweep_spec.yaml")
        folder.mkdir(parents=True, exist_ok=True)
        id_file.write_text(parent_run_id)

    trainable = tune.with_parameters(
        run_trial, base=spec.to_pinned_dict(), rows=rows, dimension=dimension, fingerprint=fingerprint, parent_run_id=parent_run_id
    )
    # The trial function only drives a TorchTrainer, whose workers hold the CPUs/GPUs.
    trainable = tune.with_resources(trainable, {"cpu": 0.1})
    experiment = folder / name
    if tune.Tuner.can_restore(str(experiment)):
        log.info("sweep: resuming %s", experiment)
        tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_errored=True)
    else:
        scheduler = (
            ASHAScheduler(time_attr="training_iteration", grace_period=sweep.grace_period, reduction_factor=sweep.reduction_factor)
            if sweep.asha
            else None
        )
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(spec),
            tune_config=tune.TuneConfig(
                metric=sweep.metric, mode=sweep.mode, num_samples=sweep.num_trials,
                max_concurrent_trials=sweep.max_concurrent, scheduler=scheduler,
            ),
            run_config=tune.RunConfig(name=name, storage_path=str(folder)),
        )
    if not ray.is_initialized():
        from components.ray_env import connect

        connect()  # the hub token and cache location reach every worker (components/ray_env.py)
    results = tuner.fit()
    best = results.get_best_result()
    if best.metrics is None or sweep.metric not in best.metrics:
        raise RuntimeError(f"sweep: no trial reported '{sweep.metric}' (is data.holdout_fraction > 0?)")
    best_spec = trial_spec(spec, {key: best.config[key] for key in spec.sweep.space})
    best_path = folder / "best.yaml"
    best_path.write_text(f"# Best trial of {name}: {sweep.metric} = {best.metrics[sweep.metric]:.6g} ({sweep.mode})\n" + best_spec.to_yaml())
    return {"best_spec": str(best_path), "best_config": {key: best.config[key] for key in spec.sweep.space},
            "best_metric": best.metrics[sweep.metric], "trials": len(results), "errors": len(results.errors)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workflows.sweep", description=__doc__.split("\n\n")[0])
    add_spec_arguments(parser)
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    spec = spec_from_args(args)
    if spec is None:
        return 2
    if spec.sweep is None:
        print(f"error: {args.spec}: sweep: required key is missing (this command needs a sweep section)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        outcome = run_sweep(spec)
    except Exception as err:  # reported with its cause; the exit code says it failed
        log.exception("sweep failed")
        print(f"error: sweep failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    print(f"best {spec.sweep.metric} = {outcome['best_metric']:.6g} with {outcome['best_config']}")
    print(f"best spec: {outcome['best_spec']} ({outcome['trials']} trials, {outcome['errors']} errors)")
    if outcome["errors"]:
        print(f"error: {outcome['errors']} of {outcome['trials']} trials failed (the best spec is of those that finished); "
              f"run the same command again to resume them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
