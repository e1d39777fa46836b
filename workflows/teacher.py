"""The teacher stage: train an LLM2Vec teacher from the backbone itself, so that no second model is needed anywhere.

    python -m workflows.teacher SPEC [--set key=value ...]      (or the `teacher` stage of workflows.run)

    texts (spec.teacher.train: the queries, the generated answers, more files) -> Ray Train + DeepSpeed:
        1. bidirectional attention, MNTP with a LoRA adapter (masked token i predicted from position i - 1)
        2. the MNTP adapter merged, unsupervised SimCSE with a second LoRA adapter (dropout views, in-batch negatives)
    -> <run_dir>/teacher/<key>/teacher/     an ordinary llm2vec teacher folder:
           llm2vec_teacher.json               {"model": "mntp", "adapters": ["simcse"]}
           mntp/    adapter_config.json (base_model_name_or_path: the backbone), adapter_model.safetensors, tokenizer
           simcse/  adapter_config.json, adapter_model.safetensors
           base/    the backbone's weights, only for a random (built in code) backbone, which has no folder

The key hashes the backbone, the teacher.train section and the texts: the same inputs find the folder and train
nothing. Checkpoints hold only the LoRA tensors and the optimizer state (the frozen backbone is never copied); a
lost worker resumes from the last one, and running the same spec again resumes the same Ray Train run. Tracked in
MLflow as its own run (the spec's experiment): params, loss curves, the teacher folder as an artifact.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from components.spec import Spec, validate_spec

log = logging.getLogger("workflows.teacher")

TEACHER_FORMAT = 1  # bump when the code changes what this stage produces for the same inputs
TEACHER_DIR = "teacher"
MNTP_ADAPTER = "mntp-adapter"  # written when MNTP ends, before any SimCSE step: a resumed SimCSE merges it
FAIL_AT_STEP_ENV = "LLM2VEC_GEN_TEACHER_FAIL_AT_STEP"  # test hook, as LLM2VEC_GEN_FAIL_AT_STEP of the train stage
# Keys that do not change what is trained: left out of the output's key.
_OPERATIONAL = {"checkpoint_every", "log_every", "max_failures", "use_gpu"}


class TeacherTrainingError(ValueError):
    """A teacher.train section cannot be trained as given; the message names the key and why."""


# ---------------------------------------------------------------------------------------------- the texts


def teacher_texts(spec: Spec, responses: str | Path | None = None) -> list[str]:
    """The unlabeled texts of teacher.train, in a fixed order, without duplicates or blank texts."""
    from components.queries import load_queries
    from components.spec import DataSpec

    train = spec.teacher.train
    assert train is not None
    texts: list[str] = []
    if "queries" in train.texts:
        texts += load_queries(spec.data).texts
    if "responses" in train.texts:
        from components.stages import ShardedOutput
        from workflows.generate import run_generate

        folder = Path(responses) if responses else run_generate(spec)
        texts += ShardedOutput.load(folder).read(columns=["response"]).column("response").to_pylist()
    if train.sources:
        from components.queries import DataError

        try:
            texts += load_queries(DataSpec(sources=train.sources, seed=spec.data.seed)).texts
        except DataError as err:  # its keys are data.sources[...]: here they are teacher.train.sources[...]
            message = str(err).replace("data.sources", "teacher.train.sources").removeprefix("data: ")
            raise TeacherTrainingError(f"teacher.train: no text to train on: {message}") from None
    unique = list(dict.fromkeys(text.strip() for text in texts if text and text.strip()))
    if train.max_texts is not None and len(unique) > train.max_texts:
        unique = sorted(random.Random(train.seed).sample(unique, train.max_texts), key=unique.index)
    if not unique:
        raise TeacherTrainingError(f"teacher.train: no text to train on (texts {train.texts}, "
                                   f"{len(train.sources)} sources gave none that is not blank)")
    for phase, section in (("mntp", train.mntp), ("simcse", train.simcse)):
        if section.steps and len(unique) < section.batch_size:
            raise TeacherTrainingError(f"teacher.train.{phase}.batch_size: {section.batch_size} texts per step, but "
                                       f"only {len(unique)} texts to train on")
    return unique


def teacher_key(spec: Spec, texts: list[str]) -> str:
    from components.generation import backbone_identity

    train = spec.teacher.train
    inputs = {
        "stage": "teacher",
        "format": TEACHER_FORMAT,
        "backbone": spec.backbone.model_dump(mode="json"),
        "backbone_fingerprint": backbone_identity(spec.backbone).fingerprint,
        "train": train.model_dump(mode="json", exclude=_OPERATIONAL),
        "texts_sha256": hashlib.sha256("\x00".join(texts).encode()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def teacher_output(spec: Spec, responses: str | Path | None = None) -> tuple[Path, list[str], str]:
    texts = teacher_texts(spec, responses)
    key = teacher_key(spec, texts)
    return (spec.run_dir / "teacher" / key).resolve(), texts, key


def trained_teacher_spec(spec: Spec, responses: str | Path | None = None) -> Spec:
    """`spec` with teacher.train replaced by the folder the teacher stage trained (for the stages after it)."""
    if spec.teacher.train is None:
        return spec
    output, _, _ = teacher_output(spec, responses)
    folder = output / TEACHER_DIR
    if not (folder / "llm2vec_teacher.json").is_file():
        raise TeacherTrainingError(f"teacher.train: no trained teacher at {folder} yet; run the teacher stage "
                                   "(python -m workflows.run SPEC --stages generate,teacher)")
    teacher = spec.teacher.model_copy(update={"name": str(folder), "train": None})
    return spec.model_copy(update={"teacher": teacher})


# ------------------------------------------------------------------------------------------------ the driver


def run_teacher(spec: Spec, responses: str | Path | None = None) -> dict[str, Any]:
    """Train the teacher of spec.teacher.train (unless trained already); returns its folder and MLflow run."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    train = spec.teacher.train
    if train is None:
        raise TeacherTrainingError("teacher.train: the spec has no teacher.train section: nothing to train")
    output, texts, key = teacher_output(spec, responses)
    if (output / TEACHER_DIR / "llm2vec_teacher.json").is_file():
        log.info("teacher: %s exists, skipping", output / TEACHER_DIR)
        return json.loads((output / "result.json").read_text())
    output.mkdir(parents=True, exist_ok=True)
    (output / "inputs.json").write_text(json.dumps({"texts": len(texts), "train": train.model_dump(mode="json")},
                                                   indent=2))
    name = f"teacher-{key}"
    storage = (spec.run_dir / "ray_train").resolve()
    log.info("teacher: training on %d texts (%d MNTP + %d SimCSE steps) into %s", len(texts), train.mntp.steps,
             train.simcse.steps, output)
    import ray.data

    dataset = ray.data.from_items([{"id": index, "text": text} for index, text in enumerate(texts)])
    dataset.context.enable_progress_bars = False
    trainer = TorchTrainer(
        teacher_loop_per_worker,
        train_loop_config={
            "spec": spec.to_pinned_dict(),
            "output": str(output),
            "name": name,
            "checkpoints": str(storage / name),
            "fail_at": os.environ.get(FAIL_AT_STEP_ENV),
        },
        scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu),
        torch_config=TorchConfig(backend="nccl" if train.use_gpu else "gloo"),
        datasets={"texts": dataset},
        dataset_config=DataConfig(datasets_to_split=[]),  # every worker reads all texts, takes its share per step
        run_config=RunConfig(name=name, storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"teacher training failed: {result.error}")
    return json.loads((output / "result.json").read_text())


# ---------------------------------------------------------------------------------------- the training loop


class _MNTPObjective(torch.nn.Module):
    """The LoRA-wrapped bidirectional decoder and the frozen LM head: MNTP loss of a masked batch."""

    def __init__(self, decoder, lm_head):
        super().__init__()
        self.decoder, self.lm_head = decoder, lm_head

    def forward(self, inputs, attention_mask, labels):
        from components.llm2vec import encoder_states, mntp_loss

        return mntp_loss(encoder_states(self.decoder, inputs, attention_mask), self.lm_head, labels)


class _SimCSEObjective(torch.nn.Module):
    """Two passes of the same batch with dropout on: each text's two views are positives, the rest negatives."""

    def __init__(self, decoder, temperature: float):
        super().__init__()
        self.decoder, self.temperature = decoder, temperature

    def forward(self, batch):
        from components.llm2vec import embed_batch, simcse_loss

        return simcse_loss(embed_batch(self.decoder, batch), embed_batch(self.decoder, batch), self.temperature)


def _batch_texts(texts: list[str], batch_size: int, step: int, seed: int, rank: int, world_size: int) -> list[str]:
    """This worker's share of the global batch of `step`: a pure function of (texts, seed, step), so a resumed
    run sees exactly the texts it would have (epochs are fresh permutations)."""
    per_epoch = len(texts) // batch_size
    epoch, position = divmod(step, per_epoch)
    order = list(range(len(texts)))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    chosen = order[position * batch_size : (position + 1) * batch_size]
    share = batch_size // world_size
    return [texts[i] for i in chosen[rank * share : (rank + 1) * share]]


def teacher_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    from peft import get_peft_model

    from components.backbone import load_backbone
    from components.llm2vec import lora_config, make_bidirectional, merge_adapter, set_attention_dropout
    from workflows.train import latest_checkpoint

    spec = validate_spec(config["spec"], source="train_loop_config")
    train = spec.teacher.train
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    output = Path(config["output"])
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    device = torch.device("cuda", torch.cuda.current_device()) if train.use_gpu else torch.device("cpu")

    texts = [row["text"] for row in sorted(ray.train.get_dataset_shard("texts").iter_rows(), key=lambda r: r["id"])]
    backbone = load_backbone(spec.backbone)
    causal = backbone.model.float() if train.precision == "fp32" else backbone.model
    decoder, lm_head, tokenizer = causal.model, causal.lm_head, backbone.tokenizer
    make_bidirectional(decoder)
    for parameter in causal.parameters():
        parameter.requires_grad_(False)
    causal.to(device)

    on_disk = latest_checkpoint(Path(config["checkpoints"]))
    checkpoint = ray.train.get_checkpoint()
    state: dict[str, Any] = {"step": 0, "phase": "mntp", "mlflow_run_id": None}
    source = str(on_disk) if on_disk is not None else None
    if source is None and checkpoint is not None:
        with checkpoint.as_directory() as folder:
            source = folder
            state = _client_state(folder)
    elif source is not None:
        state = _client_state(source)
    mntp_steps, total = train.mntp.steps, train.mntp.steps + train.simcse.steps
    tracker = _Tracker(spec, config["name"], state["mlflow_run_id"]) if rank == 0 and spec.tracking.enabled else None

    # Phase 1: MNTP. The LoRA starts as a no-op (B = 0), so a phase of 0 steps leaves the model as it was.
    torch.manual_seed(train.seed)
    mntp_model = get_peft_model(decoder, lora_config(train.lora_r, train.lora_alpha, train.lora_dropout,
                                                     train.lora_targets))
    saved = output / MNTP_ADAPTER / "adapter_config.json"
    if state["step"] < mntp_steps:
        objective = _MNTPObjective(mntp_model, lm_head)
        _run_phase("mntp", objective, train.mntp, 0, mntp_steps, state, source, texts, tokenizer, config, tracker,
                   rank, world_size, device)  # saves the adapter when it ends
        merged = mntp_model.merge_and_unload()
    elif mntp_steps == 0:  # no MNTP: the untrained (no-op) adapter keeps the folder's layout the same
        if rank == 0 and not saved.is_file():
            _save_adapter(mntp_model, output / MNTP_ADAPTER)
        merged = mntp_model.merge_and_unload()
    elif saved.is_file():  # resumed after MNTP: its adapter was saved before any SimCSE step
        merged = merge_adapter(mntp_model.unload(), str(output / MNTP_ADAPTER))
    else:
        raise RuntimeError(f"resumed at step {state['step']} after MNTP, but its adapter {saved.parent} is missing")
    _barrier(world_size)

    # Phase 2: unsupervised SimCSE on the merged MNTP weights.
    set_attention_dropout(merged, train.simcse.dropout)
    torch.manual_seed(train.seed + 1)
    simcse_model = get_peft_model(merged, lora_config(train.lora_r, train.lora_alpha, train.lora_dropout,
                                                      train.lora_targets))
    objective = _SimCSEObjective(simcse_model, train.simcse.temperature)
    _run_phase("simcse", objective, train.simcse, mntp_steps, total, state, source, texts, tokenizer, config,
               tracker, rank, world_size, device)

    if rank == 0:
        folder = _write_teacher(output, simcse_model, tokenizer, spec)
        summary = {"teacher_dir": str(folder), "texts": len(texts), "mntp_steps": mntp_steps,
                   "simcse_steps": train.simcse.steps}
        if tracker:
            summary |= tracker.finish(folder)
        (output / "result.json").write_text(json.dumps(summary, indent=2))


def _run_phase(phase, objective, section, first_step, end_step, state, source, texts, tokenizer, config, tracker,
               rank, world_size, device) -> None:
    """Steps [first_step, end_step) of one phase (global step numbers), resumed from `source` when it is this phase's."""
    import deepspeed

    from components.llm2vec import mask_token_id, mntp_inputs, tokenize
    from components.training import lr_factor
    from workflows.train import _maybe_inject_failure

    spec = validate_spec(config["spec"], source="train_loop_config")
    train = spec.teacher.train
    start = max(first_step, state["step"])
    if start >= end_step:
        return
    trainable = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=section.lr, weight_decay=train.weight_decay)
    steps = end_step - first_step
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, train.warmup_steps, steps))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=objective, optimizer=optimizer, lr_scheduler=scheduler, dist_init_required=False,
        config={
            "train_micro_batch_size_per_gpu": section.batch_size // world_size,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": train.grad_clip,
            "zero_optimization": {"stage": 0},
            "bf16": {"enabled": train.precision == "bf16"},
            "zero_allow_untested_optimizer": True,  # a plain torch AdamW: DeepSpeed's fused ones need a GPU
            "steps_per_print": 10**9,
        },
    )
    if source is not None and state["phase"] == phase and state["step"] > first_step:
        engine.load_checkpoint(source, tag="state", load_module_strict=False)
        log.info("rank %d: %s resumed at step %d", rank, phase, state["step"])
    objective.train()
    mask_id = mask_token_id(tokenizer, train.mntp.mask_token) if phase == "mntp" else None
    window: list[float] = []
    started = time.perf_counter()
    for step in range(start, end_step):
        chosen = _batch_texts(texts, section.batch_size, step - first_step, train.seed, rank, world_size)
        batch = tokenize(tokenizer, chosen, section.max_tokens, device)
        if phase == "mntp":
            generator = torch.Generator().manual_seed(train.seed * 1_000_003 + step * 101 + rank)
            inputs, labels = mntp_inputs(batch, mask_id, len(tokenizer), section.mask_probability, generator)
            loss = engine(inputs, batch.attention_mask, labels)
        else:
            loss = engine(batch)
        engine.backward(loss)
        engine.step()
        window.append(loss.item())
        done = step + 1
        checkpointing = done % train.checkpoint_every == 0 or done == end_step
        if done % train.log_every and not checkpointing:
            continue
        metrics = {f"{phase}_loss": sum(window) / len(window), f"{phase}_lr": scheduler.get_last_lr()[-1],
                   "texts_per_s": len(window) * section.batch_size / (time.perf_counter() - started), "step": done}
        if tracker:
            tracker.log(metrics, done)
        log.info("teacher %s step %d/%d: loss %.4f", phase, done, end_step, metrics[f"{phase}_loss"])
        _maybe_inject_failure(config.get("fail_at"), done, rank, world_size)
        if checkpointing:
            if phase == "mntp" and done == end_step and rank == 0:
                # Saved before the checkpoint that says MNTP is over, so that a resumed SimCSE always finds it.
                _save_adapter(objective.decoder, Path(config["output"]) / MNTP_ADAPTER)
            _report_checkpoint(engine, metrics, {"step": done, "phase": phase,
                                                 "mlflow_run_id": tracker.run_id if tracker else None})
        else:
            import ray.train

            ray.train.report(metrics)
        window, started = [], time.perf_counter()
    state["step"] = end_step
    state["phase"] = phase


def _report_checkpoint(engine, metrics: dict[str, float], client_state: dict[str, Any]) -> None:
    import ray.train
    from ray.train import Checkpoint

    from workflows.train import COMPLETE

    with tempfile.TemporaryDirectory() as folder:
        # LoRA tensors and the optimizer only: the frozen backbone is never written into a checkpoint.
        engine.save_checkpoint(folder, tag="state", client_state=client_state, exclude_frozen_parameters=True)
        written = any(Path(folder).rglob("*.pt"))
        if written:
            (Path(folder) / COMPLETE).write_text(json.dumps(client_state | {"step": client_state["step"]}))
            (Path(folder) / "client_state.json").write_text(json.dumps(client_state))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder) if written else None)


def _client_state(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "client_state.json").read_text())


def _barrier(world_size: int) -> None:
    if world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _save_adapter(peft_model, folder: Path) -> None:
    """peft's adapter files, written to a temporary folder and renamed into place (whole or absent)."""
    staging = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    peft_model.save_pretrained(staging)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staging, folder)


def _write_teacher(output: Path, simcse_model, tokenizer, spec: Spec) -> Path:
    """The teacher folder in the published layout (module docstring), staged and renamed into place."""
    from components.backbone import build_random_backbone, resolve_folder

    staging = output / f".{TEACHER_DIR}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    if spec.backbone.source == "random":
        model, _ = build_random_backbone(spec.backbone.random)  # the untouched base weights
        model.save_pretrained(staging / "base")
        tokenizer.save_pretrained(staging / "base")
        base = "../base"
    elif spec.backbone.source == "hub":
        base = spec.backbone.name
    else:
        base = str(resolve_folder(spec.backbone)[0].resolve())
    shutil.copytree(output / MNTP_ADAPTER, staging / "mntp")
    tokenizer.save_pretrained(staging / "mntp")
    simcse_model.save_pretrained(staging / "simcse")
    for adapter, named in (("mntp", base), ("simcse", base)):
        path = staging / adapter / "adapter_config.json"
        adapter_config = json.loads(path.read_text())
        adapter_config["base_model_name_or_path"] = named
        path.write_text(json.dumps(adapter_config, indent=2))
    (staging / "llm2vec_teacher.json").write_text(json.dumps(
        {"model": "mntp", "adapters": ["simcse"], "pooling": "mean", "normalize": False,
         "bidirectional": True, "trained_by": "workflows.teacher"}, indent=2))
    final = output / TEACHER_DIR
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    return final


class _Tracker:
    """The rank-0 MLflow run of one teacher training: params once, loss curves, the teacher folder at the end."""

    def __init__(self, spec: Spec, name: str, run_id: str | None):
        import mlflow

        from components.tracking import flatten, start_run

        self.spec = spec
        self.run = start_run(spec, run_name=name, run_id=run_id)
        self.run_id = self.run.info.run_id
        if run_id is None:
            mlflow.log_params(flatten({"teacher": spec.teacher.model_dump(mode="json"),
                                       "backbone": spec.backbone.model_dump(mode="json")}))
            mlflow.log_text(spec.to_yaml(), "spec.yaml")

    def log(self, metrics: dict[str, float], step: int) -> None:
        import mlflow

        mlflow.log_metrics({key: value for key, value in metrics.items() if key != "step"}, step=step)

    def finish(self, folder: Path) -> dict[str, Any]:
        import mlflow

        from components.tracking import tracking_uri

        mlflow.log_artifacts(str(folder), "teacher_folder")
        mlflow.end_run()
        return {"mlflow_run_id": self.run_id, "mlflow_tracking_uri": tracking_uri(self.spec),
                "teacher_uri": f"runs:/{self.run_id}/teacher_folder"}


# ----------------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    from workflows._cli import add_spec_arguments, spec_from_args

    parser = argparse.ArgumentParser(prog="python -m workflows.teacher", description=__doc__.split("\n\n")[0])
    add_spec_arguments(parser)
    args = parser.parse_args(argv)
    spec = spec_from_args(args)
    if spec is None:
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        result = run_teacher(spec)
    except TeacherTrainingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
