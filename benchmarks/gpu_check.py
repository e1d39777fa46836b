"""The whole pipeline on one GPU, proven in one command: generate, teach, train (bf16, DeepSpeed ZeRO-2, NCCL),
evaluate, a killed worker resumed, and the first steps' losses against float32 on the CPU.

    python -m benchmarks.gpu_check [--cpu] [--out DIR] [--work DIR] [--parts tiny,smollm2] [--data DIR]
                                   [--smollm2-config DIR] [--prepare] [--preflight-only]

Two parts, each driven through `python -m workflows.run` (subprocesses, as a user runs it) on a small data limit:
    tiny      specs/tiny.yaml (a 2-layer random llama built in code)
    smollm2   specs/smollm2-135m.yaml's settings on SmolLM2-135M-Instruct's config and tokenizer with seeded random
              weights (benchmarks/random_backbone.py; the real weights do not travel to a device machine), the
              backbone's own mean-pooled states as the teacher (the MiniLM package does not travel either)
Three runs per part, all in one run folder (generate and teach run once, the others find them cached):
    A  every stage, on the device (training.use_gpu, precision bf16, zero_stage 2), with the last worker killed once
       mid-training (LLM2VEC_GEN_FAIL_AT_STEP) between two checkpoints; Ray Train restarts it from the checkpoint
    B  train only, the same settings, never killed (max_failures 0, which also names it apart from A)
    C  train only, on the CPU in float32 without ZeRO (the reference path), for the first COMPARE_STEPS steps of the
       same LR schedule (schedule_steps = A's max_steps): the same batches, since the order is a pure function of
       (rows, seed, epoch)
What is read back is only what the train stage publishes: result.json, the model folder and the MLflow run.
Checks (each printed PASS/FAIL with its numbers; any FAIL makes the exit code 1):
    pipeline   A ran every stage, reached max_steps and wrote a model and an evaluation report with finite scores
    killed     the failure was injected (its marker file exists) and Ray Train recovered
    resume     A's MLflow loss history has every step 1..max_steps; exactly the steps after the last checkpoint up
               to the kill were run twice, and each with the same loss both times (same state, same batch)
    same end   A's losses per step and its final trained tensors equal B's (RESUME_TOLERANCE)
    precision  B's first COMPARE_STEPS losses (total, reconstruction, alignment) against C's: relative difference
               at most BF16_TOLERANCE_FIRST at step 1 (same weights) and BF16_TOLERANCE after (a component below
               COMPONENT_FLOOR of the total loss is compared at that scale)
Figures: training samples/s of B against C (median over steps 2.., from the MLflow metric `samples_per_s`), the
GPU memory peak during B (nvidia-smi, polled: the training worker is the only process on the GPU then), stage times.
With --cpu everything runs on the CPU (gloo; bf16 where DeepSpeed's CPU accelerator supports it, else fp32):
the same code path, for preparing and testing the script where no GPU is. A preflight prints torch, CUDA, Ray,
DeepSpeed and MLflow versions and stops (exit 2) before any work when a package, the data or a GPU is missing.
All figures go to OUT/gpu_check.json, the runs' logs to OUT/gpu_check.log. The last line printed is
`gpu_check: N/M checks passed ...`. `--prepare` copies what a device machine lacks from this checkout's
surroundings into .gpu_check/ (ignored by git; carry it): the few data files read, and SmolLM2's config and tokenizer.
"""

from __future__ import annotations

import argparse
import gzip
import importlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PREPARED = ROOT / ".gpu_check"  # ignored by git; travels to a device machine through `carry`
COMPARE_STEPS = 3
# bf16 keeps 8 bits of mantissa (relative rounding 2^-9 = 0.2% per value). Step 1 runs both sides from the same
# weights, so its losses differ by forward rounding only (0.14% on the tiny part here): 1%. Steps 2-3 add the drift
# of two bf16 updates (1.8% for the total, 2.9% for the small alignment MSE on the tiny part with its lr 1e-2): 4%.
BF16_TOLERANCE_FIRST = 0.01
BF16_TOLERANCE = 0.04
# A loss component is compared relative to itself, or to this share of the total loss where it is smaller.
COMPONENT_FLOOR = 0.01
# The resumed run replays the same batches from the restored state on the same device and kernels; only
# non-deterministic reductions (atomics in some GPU kernels) may differ, by a few bf16 roundings at most.
RESUME_TOLERANCE = 5e-3
# Files read from the data folder (data.sources and the one evaluation task): what --prepare copies.
DATA_FILES = ["nq_open/NQ-open.dev.jsonl", "stsbenchmark/sts-test.csv"]
SMOLLM2_FILES = ["config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"]
REQUIRED = ["torch", "transformers", "tokenizers", "safetensors", "numpy", "yaml", "pydantic", "pyarrow", "ray",
            "ray.train", "ray.data", "deepspeed", "mlflow", "sqlalchemy"]
# Only the evaluate stage needs these; mteb imports polars, whose runtime (51 MiB) does not fit a device call beside
# Ray, so where they are missing run A leaves the evaluate stage out and says so.
FOR_EVALUATE = ["mteb", "datasets"]
# What a device machine's image lacks (read off /work/.library/device/KINDS.md and checked here with every other
# module blocked: see docs/benchmarks.md), in the versions installed here. --prepare --wheels fetches them for
# CPython 3.12 into .whl/; deepspeed has no wheel on PyPI and is built here (pure Python, no ops).
CARRIED_WHEELS = ["ray", "deepspeed", "hjson", "pydantic", "pydantic-core", "annotated-types", "typing-inspection",
                  "jsonschema", "jsonschema-specifications", "referencing", "rpds-py", "mlflow-skinny", "mlflow-tracing",
                  "sqlalchemy", "alembic", "mako", "cryptography", "cffi", "pycparser", "opentelemetry-api",
                  "opentelemetry-sdk", "opentelemetry-proto", "opentelemetry-semantic-conventions", "cachetools", "sqlparse",
                  "importlib-metadata", "databricks-sdk", "fastapi", "starlette"]
# Parts of Ray's wheel the pipeline never loads (Java, the dashboard's source maps, RLlib, Ray LLM), and its three
# big binaries with their symbol tables stripped (they ship unstripped): 76 -> ~33 MiB.
RAY_LEFT_OUT = ("ray/jars/", "ray/rllib/", "ray/llm/", ".js.map")
RAY_STRIPPED = ("ray/_raylet.so", "ray/core/src/ray/gcs/gcs_server", "ray/core/src/ray/raylet/raylet")
WHEEL_PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
                   "manylinux2014_x86_64", "manylinux1_x86_64"]


@dataclass
class Part:
    """One end-to-end check: a spec, its overrides, and where the worker is killed."""

    name: str
    spec: str
    overrides: list[str]
    max_steps: int
    checkpoint_every: int
    fail_step: int
    timeout_s: int  # per workflows.run call on a GPU machine (16 cores); TIMEOUT_SCALE stretches it on a CPU

    def last_checkpoint_before_kill(self) -> int:
        # The kill comes after the step's metrics are logged and before its checkpoint is written.
        return ((self.fail_step - 1) // self.checkpoint_every) * self.checkpoint_every


def parts(data: Path, smollm2_backbone: Path, work: Path) -> dict[str, Part]:
    evaluation = ["evaluation.tasks=[LocalSTSBenchmark]", "evaluation.limit=16", f"evaluation.data_dir={data}"]
    queries = f"data.sources=[{{path: {data / DATA_FILES[0]}, text_field: question}}]"
    tiny = Part(
        name="tiny",
        spec=str(ROOT / "specs" / "tiny.yaml"),
        overrides=[f"output_dir={work / 'tiny'}", queries, "data.limit=32", "data.holdout_fraction=0.1",
                   "training.batch_size=4", "training.micro_batch_size=2", "training.max_steps=6",
                   "training.checkpoint_every=2", "training.log_every=1", "tracking.experiment=gpu-check-tiny",
                   *evaluation],
        max_steps=6, checkpoint_every=2, fail_step=5, timeout_s=150,
    )
    smollm2 = Part(
        name="smollm2",
        spec=str(ROOT / "specs" / "smollm2-135m.yaml"),
        overrides=[f"output_dir={work / 'smollm2'}", "backbone.source=folder", f"backbone.name={smollm2_backbone}",
                   "backbone.file=null", "teacher.kind=backbone_mean_pool", "teacher.package=null", queries,
                   "data.limit=64", "generation.max_new_tokens=16", "generation.num_actors=1",
                   "training.batch_size=8", "training.micro_batch_size=4", "training.max_steps=8",
                   "training.warmup_steps=2", "training.checkpoint_every=3", "training.log_every=1",
                   "training.max_response_tokens=16", "tracking.experiment=gpu-check-smollm2",
                   "tracking.registered_model_name=null", *evaluation],
        max_steps=8, checkpoint_every=3, fail_step=5, timeout_s=240,
    )
    return {"tiny": tiny, "smollm2": smollm2}


def device_overrides(cpu: bool, cpu_precision: str) -> list[str]:
    """The settings under test: a GPU with bf16 and ZeRO-2, or the same code path on the CPU."""
    if cpu:
        return ["training.use_gpu=false", f"training.precision={cpu_precision}", "training.zero_stage=2"]
    return ["training.use_gpu=true", "training.precision=bf16", "training.zero_stage=2",
            "generation.num_gpus_per_actor=1", "teacher.num_gpus_per_actor=1"]


def reference_overrides(part: Part) -> list[str]:
    """Run C: float32 on the CPU, no ZeRO, the first COMPARE_STEPS steps of the same schedule."""
    return ["training.use_gpu=false", "training.precision=fp32", "training.zero_stage=0", "training.max_failures=0",
            f"training.max_steps={COMPARE_STEPS}", f"training.schedule_steps={part.max_steps}",
            "generation.num_gpus_per_actor=0", "teacher.num_gpus_per_actor=0"]


# ------------------------------------------------------------------------------------------------- checks


@dataclass
class Report:
    checks: list[dict[str, Any]] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def check(self, name: str, passed: bool, detail: str, **numbers: Any) -> bool:
        self.checks.append({"check": name, "passed": bool(passed), "detail": detail, **numbers})
        print(f"{'PASS' if passed else 'FAIL'} {name}: {detail}", flush=True)
        return bool(passed)

    def figure(self, name: str, value: Any, text: str) -> None:
        self.figures[name] = value
        print(f"FIGURE {name}: {text}", flush=True)


def relative_difference(a: float, b: float, floor: float = 1e-8) -> float:
    return abs(a - b) / max(abs(b), floor)


def resume_analysis(history: list[tuple[int, float]], part: Part) -> dict[str, Any]:
    """What the loss history (step, value) of a run killed once says about its resume.

    Expected: every step 1..max_steps logged; the steps in (last checkpoint, kill step] logged twice, with the
    same loss both times; no other step twice.
    """
    by_step: dict[int, list[float]] = {}
    for step, value in history:
        by_step.setdefault(step, []).append(value)
    expected_repeats = set(range(part.last_checkpoint_before_kill() + 1, part.fail_step + 1))
    lost = sorted(set(range(1, part.max_steps + 1)) - set(by_step))
    extra = sorted(set(by_step) - set(range(1, part.max_steps + 1)))
    repeated = {step for step, values in by_step.items() if len(values) > 1}
    too_many = sorted(step for step, values in by_step.items() if len(values) > 2)
    differences = {step: relative_difference(by_step[step][0], by_step[step][-1]) for step in sorted(repeated)}
    worst = max(differences.values(), default=0.0)
    passed = (not lost and not extra and not too_many and repeated == expected_repeats and worst <= RESUME_TOLERANCE)
    return {"passed": passed, "lost": lost, "extra": extra, "repeated": sorted(repeated),
            "expected_repeats": sorted(expected_repeats), "logged_more_than_twice": too_many,
            "repeat_loss_rel_diff": worst}


def compare_histories(a: dict[int, float], b: dict[int, float], steps: list[int],
                      floors: dict[int, float] | None = None) -> tuple[float, list[int]]:
    """(largest relative difference over `steps`, steps missing on either side); a value of `b` smaller than the
    step's floor is compared at the floor's scale."""
    missing = [step for step in steps if step not in a or step not in b]
    worst = max((relative_difference(a[step], b[step], (floors or {}).get(step, 1e-8)) for step in steps
                 if step in a and step in b), default=math.inf)
    return worst, missing


def tensor_difference(first: Path, second: Path) -> tuple[float, list[str]]:
    """max |a - b| / max |b| over the trained tensors of two model folders, and the names that do not match."""
    from safetensors.torch import load_file

    a, b = load_file(first / "trainable.safetensors"), load_file(second / "trainable.safetensors")
    mismatched = sorted(set(a) ^ set(b)) + sorted(k for k in set(a) & set(b) if a[k].shape != b[k].shape)
    worst = 0.0
    for key in sorted(set(a) & set(b)):
        if a[key].shape == b[key].shape:
            scale = float(b[key].float().abs().max()) or 1.0
            worst = max(worst, float((a[key].float() - b[key].float()).abs().max()) / scale)
    return worst, mismatched


# ------------------------------------------------------------------------------------------------- runs


@dataclass
class RunResult:
    label: str
    returncode: int
    seconds: float
    stage_seconds: dict[str, float]
    result: dict[str, Any] | None
    log: str
    memory_peak_mib: float | None = None


class GpuMemoryPoller:
    """Peak of the GPU's used memory (nvidia-smi, every 0.2 s) while a run goes on, minus what was used before it."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and shutil.which("nvidia-smi") is not None
        self.baseline = self.peak = None
        self._stop = threading.Event()

    @staticmethod
    def used_mib() -> float | None:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10).stdout
            return float(out.split()[0])
        except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
            return None

    def __enter__(self) -> GpuMemoryPoller:
        if self.enabled:
            self.baseline = self.peak = self.used_mib()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.2):
            used = self.used_mib()
            if used is not None and (self.peak is None or used > self.peak):
                self.peak = used

    def __exit__(self, *_: Any) -> None:
        if self.enabled:
            self._stop.set()
            self._thread.join()

    @property
    def delta_mib(self) -> float | None:
        return None if self.peak is None or self.baseline is None else self.peak - self.baseline


TIMEOUT_SCALE = {"gpu": 1.0, "cpu": 8.0}  # --cpu runs on small shared machines: a stuck run still ends


def run_workflow(label: str, part: Part, overrides: list[str], stages: str, env_extra: dict[str, str],
                 poll_gpu: bool = False, timeout_scale: float = 1.0) -> RunResult:
    """`python -m workflows.run` on the part's spec; the result.json it wrote is found as the new one in its run folder."""
    run_dir = Path(next(o for o in overrides if o.startswith("output_dir=")).split("=", 1)[1])
    before = set(run_dir.glob("train/*/result.json"))
    command = [sys.executable, "-m", "workflows.run", part.spec, "--stages", stages]
    for override in overrides:
        command += ["--set", override]
    env = os.environ | env_extra | {"PYTHONUNBUFFERED": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                                     "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    log_path = run_dir.parent / f"{part.name}-{label.split()[0]}.log"  # followed live with tail -f
    print(f"-- {part.name} {label}: workflows.run --stages {stages} (log {log_path})", flush=True)
    started = time.perf_counter()
    with GpuMemoryPoller(poll_gpu) as poller, log_path.open("w") as sink:
        # Its own process group: on a timeout the local Ray it started (raylet, GCS, workers) goes with it.
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = process.wait(timeout=part.timeout_s * timeout_scale)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            returncode = 124
    log = log_path.read_text(errors="replace") + (f"\n[gpu_check] timed out after {part.timeout_s * timeout_scale:.0f}s" if returncode == 124 else "")
    seconds = time.perf_counter() - started
    stage_seconds = {}
    for line in log.splitlines():
        if line.startswith("== stage ") and " done in " in line:
            name, took = line[len("== stage "):].split(" done in ")
            stage_seconds[name] = float(took.rstrip("s"))
    new = sorted(set(run_dir.glob("train/*/result.json")) - before, key=lambda p: p.stat().st_mtime)
    result = json.loads(new[-1].read_text()) if new else None
    print(f"   exit {returncode} in {seconds:.0f}s, stages {stage_seconds}", flush=True)
    return RunResult(label, returncode, seconds, stage_seconds, result, log, poller.delta_mib)


def metric_history(result: dict[str, Any], key: str) -> list[tuple[int, float]]:
    """Every value of an MLflow metric of the run in `result` (result.json), in logging order."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=result["mlflow_tracking_uri"])
    metrics = client.get_metric_history(result["mlflow_run_id"], key)
    return [(m.step, m.value) for m in sorted(metrics, key=lambda m: (m.timestamp, m.step))]


def last_per_step(history: list[tuple[int, float]]) -> dict[int, float]:
    return {step: value for step, value in history}


def evaluation_averages(run_dir: Path) -> dict[str, Any] | None:
    reports = sorted(run_dir.glob("evaluation/*/results.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(reports[-1].read_text()).get("averages") if reports else None


def check_part(part: Part, cpu: bool, cpu_precision: str, work: Path, report: Report, logs: list[str],
               evaluate: bool = True) -> None:
    device = device_overrides(cpu, cpu_precision)
    marker = work / f"{part.name}-killed.marker"
    marker.unlink(missing_ok=True)
    scale = TIMEOUT_SCALE["cpu" if cpu else "gpu"]
    runs = {
        "A": run_workflow("A (all stages, worker killed once)", part, part.overrides + device,
                          "generate,teach,train" + (",evaluate" if evaluate else ""),
                          {"LLM2VEC_GEN_FAIL_AT_STEP": f"{part.fail_step}:{marker}"}, timeout_scale=scale),
    }
    runs["B"] = run_workflow("B (train, uninterrupted)", part, part.overrides + device + ["training.max_failures=0"],
                             "train", {}, poll_gpu=not cpu, timeout_scale=scale)
    runs["C"] = run_workflow("C (train, CPU float32 reference)", part, part.overrides + reference_overrides(part),
                             "train", {"CUDA_VISIBLE_DEVICES": ""}, timeout_scale=scale)
    for key, run in runs.items():
        logs.append(f"===== {part.name} run {key}: {run.label}, exit {run.returncode} =====\n{run.log[-20000:]}")
    analyse_part(part, runs, cpu, cpu_precision, marker, report, evaluate)


def analyse_part(part: Part, runs: dict[str, RunResult], cpu: bool, cpu_precision: str, marker: Path, report: Report,
                 evaluate: bool) -> None:
    """The checks and figures of one part from its three runs (A, B, C)."""
    where = "cpu" if cpu else "gpu"
    a, b, c = runs["A"], runs["B"], runs["C"]
    prefix = f"{part.name}/{where}"
    report.figures[f"{prefix}/runs"] = {key: {"returncode": r.returncode, "seconds": round(r.seconds, 1),
                                              "stages": r.stage_seconds, "result": r.result} for key, r in runs.items()}

    run_dir = Path(next(o for o in part.overrides if o.startswith("output_dir=")).split("=", 1)[1])
    averages = evaluation_averages(run_dir)
    model_ok = bool(a.result) and (Path(a.result["model_dir"]) / "llm2vec_gen.json").is_file()
    scores = [v for v in (averages or {}).values() if isinstance(v, (int, float))]
    evaluated = not evaluate or (bool(scores) and all(math.isfinite(v) for v in scores))
    report.check(f"{prefix} pipeline", a.returncode == 0 and model_ok and evaluated
                 and bool(a.result and a.result.get("steps") == part.max_steps),
                 f"run A exit {a.returncode}, steps {a.result and a.result.get('steps')}/{part.max_steps}, model "
                 f"{'written' if model_ok else 'missing'}, evaluation "
                 f"{f'averages {averages}' if evaluate else 'left out (mteb not importable here)'}, stages {a.stage_seconds}",
                 returncode=a.returncode, stage_seconds=a.stage_seconds, averages=averages)
    report.check(f"{prefix} killed", marker.exists() and a.returncode == 0,
                 f"worker killed at step {part.fail_step} ({'marker written' if marker.exists() else 'no marker: never killed'}), "
                 f"run exit {a.returncode}")
    for key, run in (("B", b), ("C", c)):
        if run.returncode != 0 or not run.result:
            report.check(f"{prefix} run {key}", False, f"exit {run.returncode}; log tail:\n{run.log[-3000:]}")
    if a.returncode != 0 or not a.result:
        print(f"run A log tail:\n{a.log[-5000:]}", flush=True)
        return

    history_a = metric_history(a.result, "loss")
    resume = resume_analysis(history_a, part)
    report.check(f"{prefix} resume", resume["passed"],
                 f"steps logged twice {resume['repeated']} (expected {resume['expected_repeats']}: after the checkpoint "
                 f"at {part.last_checkpoint_before_kill()} up to the kill at {part.fail_step}), lost {resume['lost']}, "
                 f"extra {resume['extra']}, repeated steps' loss rel. diff {resume['repeat_loss_rel_diff']:.2e} "
                 f"(tolerance {RESUME_TOLERANCE:g})", **{k: v for k, v in resume.items() if k != "passed"})
    if not b.result:
        return
    losses_a, losses_b = last_per_step(history_a), last_per_step(metric_history(b.result, "loss"))
    worst_loss, missing = compare_histories(losses_a, losses_b, list(range(1, part.max_steps + 1)))
    worst_tensor, mismatched = tensor_difference(Path(a.result["model_dir"]), Path(b.result["model_dir"]))
    report.check(f"{prefix} same end", not missing and not mismatched and worst_loss <= RESUME_TOLERANCE
                 and worst_tensor <= RESUME_TOLERANCE and a.result["steps"] == b.result["steps"],
                 f"resumed A against uninterrupted B: steps {a.result['steps']} / {b.result['steps']}, losses per step "
                 f"max rel. diff {worst_loss:.2e}, trained tensors max |diff|/max|B| {worst_tensor:.2e} (tolerance "
                 f"{RESUME_TOLERANCE:g}){f', missing steps {missing}' if missing else ''}"
                 f"{f', tensors not matching {mismatched}' if mismatched else ''}",
                 loss_rel_diff=worst_loss, tensor_rel_diff=worst_tensor)

    samples_b = last_per_step(metric_history(b.result, "samples_per_s"))
    rate_b = statistics.median([v for s, v in samples_b.items() if s >= 2] or [math.nan])
    if b.memory_peak_mib is not None:
        report.figure(f"{prefix}/gpu_memory_peak_mib", b.memory_peak_mib,
                      f"{b.memory_peak_mib:.0f} MiB above the idle GPU during run B (nvidia-smi, the training worker "
                      f"with its CUDA context)")
    if not c.result:
        report.figure(f"{prefix}/samples_per_s", {"device": rate_b}, f"{rate_b:.2f} samples/s (no CPU reference)")
        return
    comparison = {}
    # A component far below the total (the ridge-fitted alignment MSE of the smollm2 part is 2e-6 of a total of 10.7)
    # is compared at COMPONENT_FLOOR of the total: its own bf16 rounding is then not mistaken for a wrong loss.
    floors = {step: COMPONENT_FLOOR * abs(value) for step, value in last_per_step(metric_history(c.result, "loss")).items()}
    for key in ("loss", "reconstruction_loss", "alignment_loss"):
        device_losses, reference = last_per_step(metric_history(b.result, key)), last_per_step(metric_history(c.result, key))
        first, missing = compare_histories(device_losses, reference, [1], floors)
        worst, missing_later = compare_histories(device_losses, reference, list(range(2, COMPARE_STEPS + 1)), floors)
        comparison[key] = {"first_rel_diff": first, "max_rel_diff": worst, "missing": missing + missing_later,
                           "device": [device_losses.get(s) for s in range(1, COMPARE_STEPS + 1)],
                           "cpu_fp32": [reference.get(s) for s in range(1, COMPARE_STEPS + 1)]}
    precision = "bf16" if not cpu else cpu_precision
    report.check(f"{prefix} precision", all(v["first_rel_diff"] <= BF16_TOLERANCE_FIRST and v["max_rel_diff"] <= BF16_TOLERANCE
                                             and not v["missing"] for v in comparison.values()),
                 f"{where} {precision} ZeRO-2 (run B) against CPU fp32 ZeRO-0 (run C), steps 1..{COMPARE_STEPS}: " + "; ".join(
                     f"{key} {', '.join(f'{d:.5g}/{r:.5g}' for d, r in zip(v['device'], v['cpu_fp32'], strict=True) if d is not None and r is not None)}"
                     f" rel. diff step 1 {v['first_rel_diff']:.2e}, later {v['max_rel_diff']:.2e}" for key, v in comparison.items())
                 + f" (tolerance {BF16_TOLERANCE_FIRST:g} at step 1, {BF16_TOLERANCE:g} after)", comparison=comparison)
    samples_c = last_per_step(metric_history(c.result, "samples_per_s"))
    rate_c = statistics.median([v for s, v in samples_c.items() if s >= 2] or [math.nan])
    report.figure(f"{prefix}/samples_per_s", {"device": rate_b, "cpu_fp32": rate_c, "ratio": rate_b / rate_c},
                  f"training {rate_b:.2f} samples/s ({where}, {precision}, ZeRO-2) against {rate_c:.2f} (CPU, fp32): "
                  f"ratio {rate_b / rate_c:.2f} (median over steps 2.., micro batch of the part)")


# ------------------------------------------------------------------------------------------------- setup


def default_data() -> Path:
    for folder in (PREPARED / "data", ROOT.parent / "shared" / "data"):
        if all((folder / name).is_file() for name in DATA_FILES):
            return folder
    return PREPARED / "data"


def default_smollm2_config() -> Path:
    """The prepared copy, else the folder the GGUF backbone is converted into on first use (config + tokenizer)."""
    if (PREPARED / "smollm2-config" / "config.json").is_file():
        return PREPARED / "smollm2-config"
    cache = Path(os.environ.get("LLM2VEC_GEN_CACHE", Path.home() / ".cache" / "llm2vec-gen-ray")) / "gguf"
    found = sorted(cache.glob("*/config.json"))
    return found[0].parent if found else PREPARED / "smollm2-config"


def prepare(data: Path, smollm2_config: Path) -> int:
    """Copy the data files and SmolLM2's config and tokenizer into .gpu_check/ (carried to a device machine)."""
    copies = [(data / name, PREPARED / "data" / name) for name in DATA_FILES]
    copies += [(smollm2_config / name, PREPARED / "smollm2-config" / name) for name in SMOLLM2_FILES
               if (smollm2_config / name).is_file()]
    for source, target in copies:
        if source.resolve() != target.resolve():  # a second --prepare finds its own copies as the defaults
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, target)
    # The tokenizer is 3.4 MiB of JSON, 0.8 gzipped: what travels to a device machine is counted to the byte.
    tokenizer = PREPARED / "smollm2-config" / "tokenizer.json"
    if tokenizer.is_file():
        tokenizer.with_suffix(".json.gz").write_bytes(gzip.compress(tokenizer.read_bytes(), compresslevel=9))
        tokenizer.unlink()
    size = sum(p.stat().st_size for p in PREPARED.rglob("*") if p.is_file())
    print(f"prepared {PREPARED} ({size / 2**20:.1f} MiB): {', '.join(DATA_FILES)} from {data}; SmolLM2 config from {smollm2_config}")
    return 0


def prepare_wheels(target: Path) -> int:
    """CARRIED_WHEELS for CPython 3.12 on x86-64 Linux into `target`, Ray's slimmed (see RAY_LEFT_OUT)."""
    import importlib.metadata
    import zipfile

    target.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in CARRIED_WHEELS]
    binary = [pin for pin in pins if not pin.startswith("deepspeed==")]
    platforms = [arg for platform in WHEEL_PLATFORMS for arg in ("--platform", platform)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
                    "3.12", "--implementation", "cp", *platforms, "-d", str(target), *binary], check=True)
    # DeepSpeed ships only a source archive; without DS_BUILD_OPS it builds a pure-Python wheel (ops compile on use).
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(target),
                    next(pin for pin in pins if pin.startswith("deepspeed=="))], check=True)
    for wheel in target.glob("ray-*.whl"):
        slim = wheel.with_suffix(".slim")
        with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as out:
            for item in source.infolist():
                if not any(part in item.filename for part in RAY_LEFT_OUT):
                    content = source.read(item.filename)
                    if item.filename in RAY_STRIPPED and shutil.which("strip"):
                        content = stripped(content)
                    out.writestr(item, content, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
        slim.replace(wheel)
    total = sum(p.stat().st_size for p in target.glob("*.whl"))
    print(f"wheels: {len(list(target.glob('*.whl')))} in {target}, {total / 2**20:.1f} MiB")
    return 0


def stripped(binary: bytes) -> bytes:
    """An ELF file without its symbol table and debug sections (`strip --strip-unneeded`: what it links by stays)."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "binary"
        path.write_bytes(binary)
        subprocess.run(["strip", "--strip-unneeded", str(path)], check=True)
        return path.read_bytes()


def preflight(cpu: bool, data: Path, smollm2_config: Path, wanted: list[str]) -> tuple[bool, dict[str, Any]]:
    """Versions of what the pipeline needs; False (with the reasons printed) when it cannot run here."""
    info: dict[str, Any] = {"python": sys.version.split()[0], "executable": sys.executable}
    missing = []
    for name in REQUIRED:
        try:
            module = importlib.import_module(name)
            info[name] = getattr(module, "__version__", "present")
        except Exception as err:  # a broken install is as missing as an absent one
            missing.append(f"{name} ({type(err).__name__}: {err})")
    problems = [f"missing packages: {'; '.join(missing)} (carry wheels: python -m benchmarks.gpu_check --prepare --wheels)"] if missing else []
    absent_for_evaluate = []
    for name in FOR_EVALUATE:
        try:
            importlib.import_module(name)
        except Exception as err:
            absent_for_evaluate.append(f"{name} ({type(err).__name__}: {err})")
    info["evaluate"] = not absent_for_evaluate
    if absent_for_evaluate:
        print(f"NOTE preflight: the evaluate stage is left out here: {'; '.join(absent_for_evaluate)}", flush=True)
    if "transformers" in info:
        import inspect

        from transformers import LlamaModel

        # components/model.py and generation.py pass the KV cache as `cache=` (transformers >= 5.2x; older: past_key_values)
        if "cache" not in inspect.signature(LlamaModel.forward).parameters:
            problems.append(f"transformers {info['transformers']} has no `cache=` argument in LlamaModel.forward: carry "
                            "the transformers wheel of pyproject.toml's range")
    if "torch" in info:
        import torch

        info["cuda_available"] = torch.cuda.is_available()
        info["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_bf16"] = torch.cuda.is_bf16_supported()
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None
            info["gpu_memory_mib"] = torch.cuda.get_device_properties(0).total_memory // 2**20
        elif not cpu:
            problems.append("no CUDA device visible to torch (use --cpu to run the same path on the CPU)")
    if "deepspeed" in info and cpu:
        try:
            from deepspeed.accelerator import get_accelerator

            info["deepspeed_accelerator"] = get_accelerator().device_name()
            info["deepspeed_cpu_bf16"] = bool(get_accelerator().is_bf16_supported())
        except Exception as err:
            info["deepspeed_accelerator"] = f"unknown ({err})"
    absent = [name for name in DATA_FILES if not (data / name).is_file()]
    if absent:
        problems.append(f"data files not found under {data}: {', '.join(absent)} (run with --prepare where the data is, and carry .gpu_check)")
    if "smollm2" in wanted and not (smollm2_config / "config.json").is_file():
        problems.append(f"no SmolLM2 config.json in {smollm2_config} (--prepare, or --smollm2-config)")
    info["data"], info["smollm2_config"] = str(data), str(smollm2_config)
    print("preflight: " + ", ".join(f"{key} {value}" for key, value in info.items()), flush=True)
    for problem in problems:
        print(f"FAIL preflight: {problem}", flush=True)
    return not problems, info


def random_smollm2(config: Path, target: Path) -> Path:
    """SmolLM2's config and tokenizer with seeded random weights (built once per work folder)."""
    if not (target / "config.json").is_file():
        from benchmarks.random_backbone import main as build

        if (config / "tokenizer.json.gz").is_file() and not (config / "tokenizer.json").is_file():  # as --prepare left it
            unpacked = target.with_name(target.name + "-config")
            shutil.copytree(config, unpacked, dirs_exist_ok=True)
            (unpacked / "tokenizer.json").write_bytes(gzip.decompress((config / "tokenizer.json.gz").read_bytes()))
            config = unpacked
        if build([str(config), str(target)]) != 0:
            raise RuntimeError(f"could not build a random backbone from {config}")
    return target


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="the same code path on the CPU (gloo), for testing the script")
    parser.add_argument("--out", type=Path, default=None, help="where gpu_check.json and gpu_check.log go (default: WORK/out)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/llm2vec-gen-gpu-check"), help="run folders (emptied first)")
    parser.add_argument("--parts", default="tiny,smollm2", help="comma-separated, from: tiny, smollm2")
    parser.add_argument("--data", type=Path, default=None, help="the data folder (default: .gpu_check/data, else ../shared/data)")
    parser.add_argument("--smollm2-config", type=Path, default=None, help="a folder with SmolLM2's config.json and tokenizer")
    parser.add_argument("--cpu-precision", choices=["bf16", "fp32"], default=None,
                        help="with --cpu (default: bf16 where DeepSpeed's CPU accelerator supports it)")
    parser.add_argument("--prepare", action="store_true", help="copy data and SmolLM2's config into .gpu_check/ and exit")
    parser.add_argument("--wheels", action="store_true", help="with --prepare: also fetch CARRIED_WHEELS into .whl/")
    parser.add_argument("--preflight-only", action="store_true", help="print versions and check the setup, then exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = (args.data or default_data()).resolve()
    smollm2_config = (args.smollm2_config or default_smollm2_config()).resolve()
    if args.prepare:
        return prepare(data, smollm2_config) or (prepare_wheels(ROOT / ".whl") if args.wheels else 0)
    wanted = [name.strip() for name in args.parts.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in ("tiny", "smollm2")]
    if unknown:
        print(f"error: --parts: unknown part(s) {', '.join(unknown)}; known: tiny, smollm2", file=sys.stderr)
        return 2
    started = time.perf_counter()
    ok, info = preflight(args.cpu, data, smollm2_config, wanted)
    work = args.work.resolve()
    out = (args.out or work / "out").resolve()
    report = Report(figures={"preflight": info, "mode": "cpu" if args.cpu else "gpu"})
    report.check("preflight", ok, "packages, data and device present" if ok else "see the FAIL preflight lines above")
    if not ok or args.preflight_only:
        write_outputs(out, report, [], started, final=True)
        return 0 if ok else 2
    cpu_precision = args.cpu_precision or ("bf16" if info.get("deepspeed_cpu_bf16") else "fp32")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out.mkdir(parents=True, exist_ok=True)
    logs: list[str] = []
    backbone = random_smollm2(smollm2_config, work / "smollm2-random") if "smollm2" in wanted else work / "none"
    for name in wanted:
        part = parts(data, backbone, work)[name]
        part_started = time.perf_counter()
        try:
            check_part(part, args.cpu, cpu_precision, work, report, logs, evaluate=info["evaluate"])
        except Exception as err:  # a check that cannot even read its inputs is a failure of that part, not a crash
            import traceback

            report.check(f"{name} part", False, f"{type(err).__name__}: {err}")
            logs.append(traceback.format_exc())
        report.figures[f"{name}/seconds"] = round(time.perf_counter() - part_started, 1)
        write_outputs(out, report, logs, started)  # after each part: a device call cut short still returns the first
    return 0 if write_outputs(out, report, logs, started, final=True) else 1


def write_outputs(out: Path, report: Report, logs: list[str], started: float, final: bool = False) -> bool:
    out.mkdir(parents=True, exist_ok=True)
    passed = sum(c["passed"] for c in report.checks)
    report.figures["seconds"] = round(time.perf_counter() - started, 1)
    (out / "gpu_check.json").write_text(json.dumps({"checks": report.checks, "figures": report.figures}, indent=2, default=str))
    (out / "gpu_check.log").write_text("\n\n".join(logs))
    ok = bool(report.checks) and passed == len(report.checks)
    if final:
        print(f"gpu_check: {passed}/{len(report.checks)} checks passed ({'ALL PASS' if ok else 'FAILURES'}) in "
              f"{report.figures['seconds']:.0f}s, mode {report.figures.get('mode')}; figures in {out / 'gpu_check.json'}", flush=True)
    return ok


if __name__ == "__main__":
    sys.exit(main())
