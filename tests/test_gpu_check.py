"""benchmarks/gpu_check.py and what it found: its plans are valid specs, its checks can fail, and bf16 with
DeepSpeed ZeRO-2 (the GPU path) trains the tiny model on this CPU, against float32, and saves float32 tensors."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from benchmarks import gpu_check
from components.precision import training_backbone
from components.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]


def runs_of(part: gpu_check.Part, cpu: bool) -> dict[str, list[str]]:
    device = gpu_check.device_overrides(cpu, "bf16")
    return {"A": part.overrides + device, "B": part.overrides + device + ["training.max_failures=0"],
            "C": part.overrides + gpu_check.reference_overrides(part)}


@pytest.mark.parametrize("cpu", [False, True])
def test_every_planned_run_is_a_valid_spec_with_the_settings_under_test(tmp_path, cpu):
    for part in gpu_check.parts(tmp_path / "data", tmp_path / "smollm2", tmp_path / "work").values():
        specs = {key: load_spec(part.spec, overrides) for key, overrides in runs_of(part, cpu).items()}
        a, b, c = specs["A"].training, specs["B"].training, specs["C"].training
        assert (a.use_gpu, a.precision, a.zero_stage) == (not cpu, "bf16", 2)
        assert b.model_copy(update={"max_failures": a.max_failures}) == a and b.max_failures == 0
        assert (c.use_gpu, c.precision, c.zero_stage) == (False, "fp32", 0)
        assert (a.max_steps, a.checkpoint_every) == (part.max_steps, part.checkpoint_every)
        # C runs the first steps of A's schedule; the kill falls between two checkpoints, after the first
        assert c.max_steps == gpu_check.COMPARE_STEPS and c.schedule_steps == a.max_steps
        assert part.checkpoint_every < part.fail_step < part.max_steps and part.fail_step % part.checkpoint_every
        assert a.grad_accumulation > 1  # ZeRO-2's gradient partitions across micro batches are exercised
        # B and C must train anew (another run name) but find A's generate and teach outputs (same inputs)
        assert len({s.fingerprint("training") for s in specs.values()}) == 3
        for section in ("backbone", "data", "tokens", "model", "loss"):
            assert len({s.fingerprint(section) for s in specs.values()}) == 1, section
        # the teacher's actors may sit on another device; what the teach stage's output is keyed by stays
        teachers = {s.teacher.model_dump_json(exclude={"num_actors", "num_cpus_per_actor", "num_gpus_per_actor"})
                    for s in specs.values()}
        assert len(teachers) == 1
        assert specs["A"].run_dir == specs["C"].run_dir == tmp_path / "work" / part.name


def test_resume_analysis_passes_a_clean_resume_and_fails_each_kind_of_damage():
    part = gpu_check.Part("p", "s", [], max_steps=8, checkpoint_every=3, fail_step=5, timeout_s=1)
    clean = [(s, 1.0 / s) for s in range(1, 6)] + [(4, 0.25), (5, 0.2)] + [(s, 1.0 / s) for s in (6, 7, 8)]
    assert gpu_check.resume_analysis(clean, part)["passed"]
    lost = [item for item in clean if item[0] != 7]
    assert gpu_check.resume_analysis(lost, part)["lost"] == [7]
    assert not gpu_check.resume_analysis(lost, part)["passed"]
    repeated_too_early = clean + [(2, 0.5)]  # a step before the checkpoint run again: the resume started too early
    assert not gpu_check.resume_analysis(repeated_too_early, part)["passed"]
    not_replayed = clean[:6] + clean[7:]  # step 5 logged once: the resume skipped it
    assert [step for step, _ in not_replayed].count(5) == 1
    assert not gpu_check.resume_analysis(not_replayed, part)["passed"]
    other_state = [(s, v * (1.1 if i == 5 else 1.0)) for i, (s, v) in enumerate(clean)]  # the replayed step 4 differs
    analysis = gpu_check.resume_analysis(other_state, part)
    assert not analysis["passed"] and analysis["repeat_loss_rel_diff"] == pytest.approx(0.1 / 1.1)


def test_preflight_names_what_is_missing(tmp_path, capsys):
    ok, info = gpu_check.preflight(cpu=True, data=tmp_path, smollm2_config=tmp_path, wanted=["tiny", "smollm2"])
    printed = capsys.readouterr().out
    assert not ok and "data files not found" in printed and "no SmolLM2 config.json" in printed
    assert info["torch"] and info["deepspeed"] and info["ray"]  # versions are printed
    for name in gpu_check.DATA_FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    ok, _ = gpu_check.preflight(cpu=True, data=tmp_path, smollm2_config=tmp_path, wanted=["tiny"])
    assert ok
    ok, _ = gpu_check.preflight(cpu=False, data=tmp_path, smollm2_config=tmp_path, wanted=["tiny"])
    assert not ok and "no CUDA device" in capsys.readouterr().out  # this machine has no GPU


def test_bf16_training_loads_the_backbone_in_bf16_too(tiny_spec):
    bf16 = load_spec("specs/tiny.yaml", ["training.precision=bf16"])
    assert training_backbone(bf16.backbone, bf16.training).dtype == "bfloat16"
    assert training_backbone(tiny_spec.backbone, tiny_spec.training) == tiny_spec.backbone


# In a child process: DeepSpeed keeps process-wide state, and this test must not leave a process group behind.
BF16_STEP = textwrap.dedent("""
    import json, os, socket, sys
    import torch, deepspeed
    from components.backbone import load_backbone
    from components.model import LLM2VecGen
    from components.precision import restore_full_precision, training_backbone
    from components.spec import load_spec
    from components.training import deepspeed_config

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    queries = ["what is rain?", "name a colour", "why is snow white?", "who keeps cats?"]
    responses = ["water falling from clouds", "blue", "ice crystals scatter light", "many people do"]
    teacher = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    out = {}
    for precision, zero in (("fp32", 0), ("bf16", 2)):
        spec = load_spec("specs/tiny.yaml", [f"training.precision={precision}", f"training.zero_stage={zero}",
                                             "training.batch_size=4", "training.micro_batch_size=2", "training.lr=0.05"])
        backbone = load_backbone(training_backbone(spec.backbone, spec.training))
        model = LLM2VecGen.from_spec(spec, embedding_dim=16, backbone=backbone)
        optimizer = torch.optim.AdamW(model.parameters(), lr=spec.training.lr)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(spec.training),
                                          dist_init_required=False)
        losses = []
        for step in range(2):
            for micro in range(2):
                rows = slice(2 * micro, 2 * micro + 2)
                batch = model.collate(queries[rows], responses[rows], teacher[rows], 16)
                result = engine(batch, spec.loss)
                engine.backward(result.total)
                engine.step()
                losses.append(result.total.item())
        working = {name: p.dtype for name, p in model.named_parameters()}
        replaced = restore_full_precision(model)
        out[precision] = {"losses": losses, "working": {k: str(v) for k, v in working.items()}, "replaced": replaced,
                          "saved": sorted({str(p.dtype) for p in model.parameters()}),
                          "backbone": str(model.backbone.get_input_embeddings().weight.dtype),
                          "encode_finite": bool(torch.isfinite(torch.as_tensor(model.encode(queries))).all())}
    print("RESULT " + json.dumps(out))
""")


def test_bf16_zero2_deepspeed_trains_on_cpu_close_to_fp32_and_restores_float32_masters():
    done = subprocess.run([sys.executable, "-c", BF16_STEP], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-5000:]
    import json

    result = json.loads(lines[-1][len("RESULT "):])
    fp32, bf16 = result["fp32"], result["bf16"]
    assert set(bf16["working"].values()) == {"torch.bfloat16"} and bf16["backbone"] == "torch.bfloat16"
    assert set(fp32["working"].values()) == {"torch.float32"} and fp32["backbone"] == "torch.float32"
    # the five trained tensors come back from ZeRO-2's float32 masters; plain fp32 ZeRO-0 keeps no copies
    assert bf16["replaced"] == 5 and bf16["saved"] == ["torch.float32"] and fp32["replaced"] == 0
    assert bf16["encode_finite"] and fp32["encode_finite"]
    for ours, reference in zip(bf16["losses"], fp32["losses"], strict=True):
        assert abs(ours - reference) <= gpu_check.BF16_TOLERANCE * abs(reference), (bf16["losses"], fp32["losses"])
    assert bf16["losses"][-1] != bf16["losses"][0]  # the steps did update


def test_analysis_reads_mlflow_and_model_folders_and_fails_when_the_resumed_end_differs(tmp_path):
    import mlflow
    import torch
    from safetensors.torch import save_file

    part = gpu_check.parts(tmp_path, tmp_path, tmp_path / "work")["tiny"]  # 6 steps, checkpoints every 2, kill at 5
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.tracking.MlflowClient(uri)
    experiment = client.create_experiment("check")

    def run(steps: list[int], weights: torch.Tensor, scale: float = 1.0) -> gpu_check.RunResult:
        run_id = client.create_run(experiment).info.run_id
        for index, step in enumerate(steps):
            for key in ("loss", "reconstruction_loss", "alignment_loss", "samples_per_s"):
                client.log_metric(run_id, key, scale * (10.0 - step) if key != "samples_per_s" else 5.0, step=step,
                                  timestamp=1000 + index)
        folder = tmp_path / run_id
        folder.mkdir()
        save_file({"special_embeddings": weights}, folder / "trainable.safetensors")
        (folder / "llm2vec_gen.json").write_text("{}")
        result = {"model_dir": str(folder), "steps": max(steps), "mlflow_run_id": run_id, "mlflow_tracking_uri": uri}
        return gpu_check.RunResult("x", 0, 1.0, {}, result, "")

    weights = torch.ones(3, 4)
    marker = tmp_path / "killed"
    marker.touch()
    runs = {"A": run([1, 2, 3, 4, 5, 5, 6], weights), "B": run([1, 2, 3, 4, 5, 6], weights),
            "C": run([1, 2, 3], weights, scale=1.002)}
    report = gpu_check.Report()
    gpu_check.analyse_part(part, runs, True, "bf16", marker, report, evaluate=False)
    assert [c["check"] for c in report.checks] == [f"tiny/cpu {name}" for name in
                                                   ("pipeline", "killed", "resume", "same end", "precision")]
    assert all(c["passed"] for c in report.checks), report.checks
    assert report.figures["tiny/cpu/samples_per_s"]["ratio"] == pytest.approx(1.0)

    runs["B"] = run([1, 2, 3, 4, 5, 6], weights * 1.1)  # the resumed run ended elsewhere than the uninterrupted one
    runs["C"] = run([1, 2, 3], weights, scale=1.05)  # and the device's first loss is 5% off float32
    report = gpu_check.Report()
    gpu_check.analyse_part(part, runs, True, "bf16", marker, report, evaluate=False)
    failed = {c["check"] for c in report.checks if not c["passed"]}
    assert failed == {"tiny/cpu same end", "tiny/cpu precision"}
