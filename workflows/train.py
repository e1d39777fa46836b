"""Training stage: Ray Train TorchTrainer, DeepSpeed inside the loop, MLflow on rank 0.

    run_train(spec, training_data(spec, teach_folder), embedding_dim) -> model folder

The rows reach the workers as one memory-mapped Arrow file (components/train_data.py), never as Python objects:
each worker builds the global batch order from the rows' token counts and reads one micro batch at a time.

Only the K special-token rows and the two projections are optimised. Checkpoints (via ray.train.report)
hold only those, DeepSpeed's optimizer and scheduler state, and the step; the step fixes the data position
because the batch order is a pure function of (rows, seed, epoch). A lost worker resumes from the last
checkpoint (FailureConfig); running the same spec again resumes the same Ray Train run by name.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from components.reporting import MetricsSender
from components.spec import Spec, validate_spec
from components.storage import RemotePath, download, filesystem_and_path, location, upload
from components.train_data import TrainingData, training_data_from_rows
from components.training import Row

log = logging.getLogger(__name__)

MODEL_DIR = "model"
COMPLETE = "complete.json"  # written into a checkpoint folder last: a resume may start from it


def training_data(spec: Spec, folder: str | Path) -> TrainingData:
    """The teach stage's output in `folder` as the train stage reads it (a cached Arrow file in the run folder)."""
    from components.train_data import prepare_training_data

    return prepare_training_data(spec, folder)


def rows_from_targets(folder: str | Path) -> tuple[list[Row], int, str]:
    """Training rows from the teach stage's output as Python objects: (rows, teacher dimension, a fingerprint).

    Small outputs only (8x the rows' float32 size): the train stage and the sweep use training_data instead.
    """
    from components.stages import ShardedOutput

    output = ShardedOutput.load(Path(folder))
    table = output.read(columns=["id", "query", "response", "teacher"])
    rows = [
        Row(id=f"{record['id']:012d}" if isinstance(record["id"], int) else str(record["id"]),
            query=record["query"], response=record["response"], teacher=tuple(record["teacher"]))
        for record in table.to_pylist()
        if record["response"].strip()  # an empty answer teaches nothing
    ]
    if not rows:
        raise ValueError(f"{folder}: no rows with a non-empty response to train on")
    return rows, len(rows[0].teacher), output.key


def training_run_name(spec: Spec, rows_fingerprint: str) -> str:
    """Same spec and same rows -> same name -> Ray Train restores instead of starting over."""
    return f"train-{spec.fingerprint('backbone', 'teacher', 'tokens', 'loss', 'model', 'training')}-{rows_fingerprint[:8]}"


def run_train(
    spec: Spec,
    rows: TrainingData | list[Row],
    embedding_dim: int | None = None,
    rows_fingerprint: str | None = None,
    callbacks: list | None = None,
    parent_run_id: str | None = None,
) -> dict[str, Any]:
    """Train with Ray Train; returns where the model is and the MLflow run.

    `rows`: the training file of training_data (a few in-memory Rows are written into one first, named by
    `rows_fingerprint`). `callbacks` go to the Ray Train run (a sweep passes Tune's report callback);
    `parent_run_id` nests the MLflow run under a sweep's run.
    """
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if isinstance(rows, list):
        if rows_fingerprint is None:
            raise ValueError("run_train: rows given as a list need a rows_fingerprint")
        rows = training_data_from_rows(spec, rows, rows_fingerprint)
    data = rows
    rows_fingerprint = rows_fingerprint or data.fingerprint
    embedding_dim = embedding_dim or data.dimension
    name = training_run_name(spec, rows_fingerprint)
    output = (spec.run_dir / "train" / name).resolve()
    model_dir = output / MODEL_DIR
    if (output / "result.json").is_file() and (model_dir / "llm2vec_gen.json").is_file():  # result.json: written last
        log.info("training: %s exists, skipping", model_dir)
        return json.loads((output / "result.json").read_text())
    storage = (spec.run_dir / "ray_train").resolve()
    # Ray Train's own idiom for shared storage: a path inside a pyarrow filesystem (None: a local folder).
    storage_filesystem, storage_path = filesystem_and_path(storage)
    # A whole-table statistic is computed here once, chunk by chunk, rather than by every worker over every row.
    mean = data.train_mean(spec) if spec.loss.center_targets else None
    datasets = data.trainer_datasets(spec)
    previous = latest_checkpoint(storage / name)
    if previous is not None:
        print(f"train: resuming {name} from {previous}", flush=True)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "spec": _pinned(spec),
            "embedding_dim": embedding_dim,
            "output": str(output),
            "name": name,
            "fail_at": os.environ.get("LLM2VEC_GEN_FAIL_AT_STEP"),
            # A path and counts, not rows: the workers memory-map the file. On a multi-node cluster the run folder
            # must already be shared storage (Ray Train's storage_path is in it), so every node reads the same file.
            "data": data,
            "mean": mean,
            "parent_run_id": parent_run_id,
            "in_sweep": bool(callbacks),
            "checkpoints": str(storage / name),
            "started": time.time(),
        },
        scaling_config=ScalingConfig(num_workers=spec.training.num_workers, use_gpu=spec.training.use_gpu),
        torch_config=TorchConfig(backend="nccl" if spec.training.use_gpu else "gloo"),
        # Every worker reads all rows and takes its own share of a global, deterministic batch order.
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[]),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=spec.training.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks or [],
        ),
    )
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"training failed: {result.error}")
    summary = json.loads((output / "result.json").read_text())
    if isinstance(location(getattr(data, "path", "")), RemotePath):  # (a test's in-memory rows have no file)
        drop_staged_copies(data.key)
    return summary


def drop_staged_copies(key: str) -> None:
    """Training is done: every alive node removes its staged copy of the train file (components/storage.py)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from components.storage import drop_staged

    drop = ray.remote(num_cpus=0)(drop_staged)
    nodes = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
    ray.get([drop.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True)).remote(key)
             for node in nodes])


def _pinned(spec: Spec) -> dict[str, Any]:
    """The spec as the workers get it: the run folder absolute and the MLflow store the driver chose (its
    MLFLOW_TRACKING_URI, e.g. the head's tracking server), so that rank 0 never falls back to a SQLite file of its own."""
    from components.tracking import tracking_uri

    pinned = spec.to_pinned_dict()
    if spec.tracking.enabled:
        pinned["tracking"] = pinned["tracking"] | {"tracking_uri": tracking_uri(spec)}
    return pinned


def train_loop_per_worker(config: dict[str, Any]) -> None:
    if not config["spec"]["training"]["use_gpu"]:
        # Ray leaves a GPU visible to workers that asked for none, and DeepSpeed would pick it (and move the model
        # there, beside a gloo process group): on a GPU machine use_gpu false must still mean the CPU.
        os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed
    import ray.train

    from components.backbone import load_backbone
    from components.model import LLM2VecGen
    from components.precision import restore_full_precision, training_backbone
    from components.training import (
        batch_schedule,
        decoded_samples,
        deepspeed_config,
        embedding_metrics,
        holdout_metrics,
        lr_factor,
    )

    spec = validate_spec(config["spec"], source="train_loop_config")
    training = spec.training
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    output = location(config["output"])  # a local folder or shared storage
    torch.manual_seed(training.seed)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))

    loop_started = time.time()
    backbone = load_backbone(training_backbone(spec.backbone, training))  # bf16: the backbone too (components/precision.py)
    model = LLM2VecGen.from_spec(spec, embedding_dim=config["embedding_dim"], backbone=backbone)
    model.gradient_checkpointing = training.gradient_checkpointing
    device = torch.device("cuda", torch.cuda.current_device()) if training.use_gpu else torch.device("cpu")
    model.to(device)
    # The training rows' token counts (the batch order is built from them); rows themselves are read per batch.
    # With center_targets, `mean` is the training rows' mean target, subtracted from the held-out ones alike.
    rows = config["data"].open(spec, model, mean=config.get("mean"))
    lengths = rows.lengths
    holdout = rows.holdout_rows() if rank == 0 else []  # only rank 0 scores and decodes them
    # Ray registers a reported checkpoint only when its controller next polls the workers: a run that dies just
    # after reporting (or a driver killed) leaves a newer, complete checkpoint on disk than the one Ray hands back,
    # or none at all. A re-run of the same spec starts from the newest complete one (same name, same folder).
    on_disk = latest_checkpoint(location(config["checkpoints"])) if config.get("checkpoints") else None
    checkpoint = ray.train.get_checkpoint()
    resuming = on_disk is not None or checkpoint is not None
    if not resuming and (spec.model.reconstruction_init == "moments" or spec.model.alignment_init == "ridge"):
        # Every worker computes the same start from the same seeded sample (a resumed run loads its checkpoint).
        started = time.perf_counter()
        _fit_heads(model, rows, spec, spec.model.reconstruction_init, spec.model.alignment_init)
        log.info("heads fitted in %.1fs", time.perf_counter() - started)
    eval_every = training.eval_every or training.checkpoint_every
    in_sweep = config.get("in_sweep", False)

    special = [model.special_embeddings]
    others = [p for p in model.trainable_parameters() if p is not model.special_embeddings]
    optimizer = torch.optim.AdamW(
        [{"params": special, "lr": training.lr * training.special_lr_scale}, {"params": others, "lr": training.lr}],
        weight_decay=training.weight_decay,
    )
    schedule_steps = training.schedule_steps or training.max_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, training.warmup_steps, schedule_steps, training.schedule)
    )
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(training), dist_init_required=False
    )

    start_step, run_id = 0, None
    if resuming:
        with _local(on_disk) if on_disk is not None else checkpoint.as_directory() as folder:
            _, client_state = engine.load_checkpoint(folder, tag="state")
        start_step, run_id = client_state["step"], client_state.get("mlflow_run_id")
    if start_step:
        print(f"rank {rank} resumed at step {start_step}", flush=True)  # stdout: it reaches the job's log

    tracker = _Tracker(spec, config["name"], run_id, config.get("parent_run_id")) if rank == 0 and spec.tracking.enabled else None
    if tracker and holdout and start_step == 0:
        tracker.log(holdout_metrics(model, holdout, training, spec.loss), 0)  # the starting point, e.g. of a fitted head
    window: dict[str, list[float]] = {}
    tokens, samples, window_start, grad_norm = 0, 0, time.perf_counter(), 0.0
    step_times: list[float] = []  # wall clock at the end of each optimizer step this run made
    try:
        for step, micro, indices in batch_schedule(lengths, training, rank, world_size):
            if step < start_step:
                continue
            if step >= training.max_steps:
                break
            queries, responses, targets = rows.batch(indices)  # one micro batch materialised at a time
            batch = model.collate(queries, responses, targets, training.max_response_tokens)
            losses = engine(batch, spec.loss)
            engine.backward(losses.total)
            if engine.is_gradient_accumulation_boundary():
                grad_norm = _grad_norm(model)
            engine.step()
            tokens += int(batch.query_mask.sum() + batch.response_mask.sum())
            samples += len(queries)
            for key, value in {
                "loss": losses.total.item(),
                "reconstruction_loss": losses.reconstruction.item(),
                "alignment_loss": losses.alignment.item(),
                **embedding_metrics(losses.embedding, batch.teacher),
            }.items():
                window.setdefault(key, []).append(value)
            if micro != training.grad_accumulation - 1:
                continue

            done = step + 1
            elapsed = time.perf_counter() - window_start
            metrics = {key: sum(values) / len(values) for key, values in window.items()}
            metrics |= {
                "step": done,
                "lr": scheduler.get_last_lr()[-1],
                "grad_norm": grad_norm,
                "samples_per_s": samples * world_size / elapsed,
                "tokens_per_s": tokens * world_size / elapsed,
            }
            checkpointing = done % training.checkpoint_every == 0 or done == training.max_steps
            reporting = checkpointing or done % training.log_every == 0
            # Under a sweep every report must carry the held-out metric the scheduler compares trials by.
            evaluating = done % eval_every == 0 or done == training.max_steps or (reporting and in_sweep)
            if rank == 0 and holdout and evaluating:
                metrics |= holdout_metrics(model, holdout, training, spec.loss)
                if tracker and training.decode_samples:
                    tracker.log_text(decoded_samples(model, holdout[: training.decode_samples]), f"decoded/step_{done:06d}.txt")
            if tracker:
                tracker.log(metrics, done)
            _maybe_inject_failure(config.get("fail_at"), done, rank, world_size)
            # ray.train.report costs ~2 s a call (it synchronises with the controller): only where Ray needs it, at
            # checkpoints and, in a sweep, at every report (Tune's scheduler compares trials by them). MLflow gets
            # every logged step from the tracker's background thread.
            if checkpointing:
                if tracker:
                    tracker.flush()  # a checkpoint never records a step whose metrics are not in the store
                _report_checkpoint(engine, metrics, done, tracker.run_id if tracker else None, rank)
            elif reporting and in_sweep:
                ray.train.report(metrics)
            window, tokens, samples, window_start = {}, 0, 0, time.perf_counter()
            step_times.append(time.time())
    except BaseException:
        if tracker:
            tracker.close(quiet=True)  # what was logged before the failure still reaches the store
        raise

    _write_worker_stats(output, rank, config.get("started"), loop_started, step_times)
    restore_full_precision(model)  # every rank (a collective under ZeRO): refit and save the float32 masters
    if rank == 0:
        if spec.model.refit_alignment:
            # The readout that minimises the alignment loss for the features training ended with, in closed form.
            _fit_heads(model, rows, spec, "keep", "ridge")
            if holdout:
                refit = holdout_metrics(model, holdout, training, spec.loss)
                log.info("after the refit: %s", refit)
                if tracker:
                    tracker.log({f"refit_{key}": value for key, value in refit.items()}, training.max_steps)
        with tempfile.TemporaryDirectory() as scratch:
            # Saved locally (the tracker logs a local folder), then copied to the run's storage when it is shared.
            local_model = model.save((output if not isinstance(output, RemotePath) else Path(scratch)) / MODEL_DIR)
            if isinstance(output, RemotePath):
                upload(local_model, output / MODEL_DIR)
            summary = {"model_dir": str(output / MODEL_DIR), "steps": training.max_steps}
            if tracker:
                summary |= tracker.finish(local_model)
        (output / "result.json").write_text(json.dumps(summary, indent=2))


def _write_worker_stats(output: Path | RemotePath, rank: int, started: float | None, loop_started: float, step_times: list[float]) -> None:
    """workers/rank-<r>.json in the training folder: this worker's peak RSS, when its first step ended and its
    step rate (the first step excluded), so that the memory and the start-up cost of a run can be read back."""
    import resource

    steps = len(step_times)
    stats = {
        "rank": rank,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        "loop_started_unix": loop_started,
        "first_step_unix": step_times[0] if steps else None,
        "first_step_after_run_train_s": step_times[0] - started if steps and started else None,
        "steps": steps,
        "steps_per_s": (steps - 1) / (step_times[-1] - step_times[0]) if steps > 1 and step_times[-1] > step_times[0] else None,
        "step_end_unix": step_times,
    }
    (output / "workers").mkdir(parents=True, exist_ok=True)
    (output / "workers" / f"rank-{rank}.json").write_text(json.dumps(stats, indent=2))
    log.info("rank %d: peak RSS %.0f MiB, %d steps, %s steps/s", rank, stats["peak_rss_mib"], steps, stats["steps_per_s"])


def _report_checkpoint(engine, metrics: dict[str, float], step: int, run_id: str | None, rank: int) -> None:
    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory() as folder:
        # Only the trained tensors, optimizer and scheduler state: the frozen backbone is never copied.
        engine.save_checkpoint(folder, tag="state", client_state={"step": step, "mlflow_run_id": run_id})
        written = any(Path(folder).rglob("*.pt"))
        if written:
            (Path(folder) / COMPLETE).write_text(json.dumps({"step": step}))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder) if written else None)


def _fit_heads(model, rows, spec: Spec, reconstruction: str, alignment: str) -> None:
    """LLM2VecGen.fit_heads on a seeded sample of the training rows (the same sample on every worker): only
    those `init_samples` rows are read."""
    count = min(spec.model.init_samples, len(rows))
    queries, _, targets = rows.batch(random.Random(spec.training.seed).sample(range(len(rows)), count))
    model.fit_heads(queries, torch.tensor(np.asarray(targets), dtype=torch.float32), reconstruction, alignment,
                    spec.model.init_ridge)


@contextlib.contextmanager
def _local(folder: Path | RemotePath):
    """A checkpoint folder as a local path DeepSpeed can load: itself, or a temporary copy from shared storage."""
    if not isinstance(folder, RemotePath):
        yield str(folder)
        return
    with tempfile.TemporaryDirectory() as scratch:
        yield str(download(folder, Path(scratch) / folder.name))


def latest_checkpoint(root: Path | RemotePath) -> Path | RemotePath | None:
    """The newest checkpoint folder under a Ray Train run folder that was completely written (has COMPLETE)."""
    complete = [folder for folder in root.glob("checkpoint_*") if (folder / COMPLETE).is_file() and (folder / "state").is_dir()]
    return max(complete, key=lambda folder: json.loads((folder / COMPLETE).read_text())["step"], default=None)


def _maybe_inject_failure(fail_at: str | None, step: int, rank: int, world_size: int) -> None:
    """Fault injection for the recovery test: LLM2VEC_GEN_FAIL_AT_STEP="STEP:MARKER" kills the last worker once."""
    if not fail_at:
        return
    at, marker = fail_at.split(":", 1)
    if step == int(at) and rank == world_size - 1 and not Path(marker).exists():
        Path(marker).touch()
        os._exit(1)


def _grad_norm(model) -> float:
    grads = [p.grad.detach().float().norm() for p in model.trainable_parameters() if p.grad is not None]
    return torch.stack(grads).norm().item() if grads else 0.0


class _Tracker:
    """The rank-0 MLflow run of one training: params once, metrics per step, artifacts and registry at the end."""

    def __init__(self, spec: Spec, name: str, run_id: str | None, parent_run_id: str | None):
        import mlflow

        from components.tracking import flatten, start_run

        self.spec = spec
        self.run = start_run(spec, run_name=name, run_id=run_id, parent_run_id=parent_run_id)
        self.run_id = self.run.info.run_id
        if run_id is None:
            mlflow.log_params(flatten(spec.to_dict()))
            mlflow.log_text(spec.to_yaml(), "spec.yaml")
        self.sender = MetricsSender(mlflow.tracking.MlflowClient(), self.run_id)

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Queued for the background sender (components/reporting.py): returns at once."""
        self.sender.log({key: value for key, value in metrics.items() if key != "step"}, step)

    def flush(self) -> None:
        self.sender.flush()

    def close(self, quiet: bool = False) -> None:
        try:
            self.sender.close()
        except Exception:
            if not quiet:
                raise
            log.exception("MLflow: metrics lost")

    def log_text(self, text: str, path: str) -> None:
        import mlflow

        mlflow.log_text(text, path)

    def finish(self, model_dir: Path) -> dict[str, Any]:
        import mlflow

        from components.tracking import log_and_register_model, tracking_uri

        self.close()  # every queued metric is in the store before the run ends
        model_uri, version = log_and_register_model(model_dir, self.spec, self.run_id)
        mlflow.end_run()
        return {"mlflow_run_id": self.run_id, "mlflow_tracking_uri": tracking_uri(self.spec), "model_uri": model_uri, "registered_version": version}
