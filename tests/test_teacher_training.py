"""The teacher stage: an LLM2Vec teacher trained from the tiny backbone itself, on Ray Train + DeepSpeed + MLflow."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
import torch

from components.spec import TeacherSpec, load_spec
from components.stages import ShardedOutput
from components.teacher import load_teacher
from tests.conftest_ray import ray_local  # noqa: F401 - a fixture
from workflows.teacher import TeacherTrainingError, _batch_texts, run_teacher, teacher_texts

SPEC = "specs/tiny-selfsupervised.yaml"


@pytest.mark.usefixtures("ray_local")
def test_the_selfsupervised_chain_trains_its_own_teacher_then_the_student_against_it(tmp_path):
    from workflows.run import main

    overrides = ["--set", f"output_dir={tmp_path}", "--set", "evaluation.suite=none"]
    assert main([SPEC, *overrides, "--stages", "generate,teacher,teach,train"]) == 0

    (folder,) = (tmp_path / "teacher").glob("*/teacher")
    assert json.loads((folder / "llm2vec_teacher.json").read_text())["adapters"] == ["simcse"]
    for adapter in ("mntp", "simcse"):
        config = json.loads((folder / adapter / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == "../base" and (folder / adapter / "adapter_model.safetensors").is_file()
    result = json.loads((folder.parent / "result.json").read_text())
    assert result["mntp_steps"] == 4 and result["simcse_steps"] == 4 and result["texts"] >= 40

    # The alignment targets are the trained teacher's unnormalised mean vectors of the answers.
    (targets,) = (tmp_path / "teach").glob("*/_SUCCESS.json")
    rows = ShardedOutput.load(targets.parent).read(columns=["response", "teacher"]).to_pylist()
    teacher = load_teacher(TeacherSpec(kind="llm2vec", name=str(folder)), backbone=None)
    expected = teacher.embed([row["response"] for row in rows[:6]])
    np.testing.assert_allclose(np.asarray([row["teacher"] for row in rows[:6]]), expected, atol=1e-5)
    assert abs(np.linalg.norm(expected[0]) - 1) > 1e-3
    base = load_teacher(TeacherSpec(kind="llm2vec", name=str(folder / "base")), backbone=None)
    assert np.abs(base.embed([rows[0]["response"]]) - expected[:1]).max() > 1e-4  # training changed the teacher

    mlflow.set_tracking_uri(result["mlflow_tracking_uri"])
    client = mlflow.tracking.MlflowClient()
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.run_name.startswith("teacher-") and run.data.params["teacher.train.mntp.steps"] == "4"
    for metric, steps in (("mntp_loss", [1, 2, 3, 4]), ("simcse_loss", [5, 6, 7, 8])):
        assert [m.step for m in client.get_metric_history(run.info.run_id, metric)] == steps
    assert "teacher_folder" in {a.path for a in client.list_artifacts(run.info.run_id)}
    (trained,) = (tmp_path / "train").glob("*/model/llm2vec_gen.json")
    assert json.loads(trained.read_text())["teacher"] == f"llm2vec:{folder}"

    # The same spec again trains nothing: the teacher folder is found and reused.
    stamp = (folder / "simcse" / "adapter_model.safetensors").stat().st_mtime_ns
    assert run_teacher(load_spec(SPEC, [f"output_dir={tmp_path}"])) == result
    assert (folder / "simcse" / "adapter_model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.usefixtures("ray_local")
def test_a_killed_worker_resumes_the_teacher_training_after_mntp(tmp_path, monkeypatch):
    marker = tmp_path / "killed-once"
    monkeypatch.setenv("LLM2VEC_GEN_TEACHER_FAIL_AT_STEP", f"5:{marker}")  # SimCSE's first step; checkpoint at 4
    spec = load_spec(SPEC, [f"output_dir={tmp_path}", "teacher.train.texts=[queries]", "teacher.train.num_workers=2"])
    result = run_teacher(spec)
    assert marker.exists()
    latest = sorted((tmp_path / "ray_train").glob("teacher-*/checkpoint_*/client_state.json"))[-1]
    assert json.loads(latest.read_text())["step"] == 8 and json.loads(latest.read_text())["phase"] == "simcse"
    # checkpoints hold only the LoRA tensors, never the frozen backbone
    state = torch.load(latest.parent / "state" / "mp_rank_00_model_states.pt", weights_only=False)
    assert state["module"] and all("lora_" in key for key in state["module"])
    client = mlflow.tracking.MlflowClient(result["mlflow_tracking_uri"])
    runs = client.search_runs([client.get_experiment_by_name("llm2vec-gen-tiny-selfsupervised").experiment_id])
    assert len(runs) == 1  # the resumed run kept logging into the same MLflow run
    assert load_teacher(TeacherSpec(kind="llm2vec", name=result["teacher_dir"]), backbone=None).embed(["x"]).shape == (1, 64)


def test_a_teacher_train_section_without_text_to_train_on_is_an_error(tmp_path):
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"q": "  "}\n{"q": ""}\n')
    spec = load_spec(SPEC, [f"output_dir={tmp_path}", "teacher.train.texts=[]",
                            f"teacher.train.sources=[{{path: {blank}, text_field: q}}]"])
    with pytest.raises(TeacherTrainingError, match="teacher.train: no text to train on"):
        teacher_texts(spec)
    few = load_spec(SPEC, [f"output_dir={tmp_path}", "teacher.train.texts=[queries]", "data.limit=5"])
    with pytest.raises(TeacherTrainingError, match=r"teacher.train.mntp.batch_size: 8 texts per step, but only 5"):
        teacher_texts(few)


def test_the_stages_after_the_teacher_say_when_it_has_not_been_trained(tmp_path, capsys):
    from workflows.run import main

    code = main([SPEC, "--set", f"output_dir={tmp_path}", "--set", "teacher.train.texts=[queries]", "--stages", "teach"])
    error = capsys.readouterr().err
    assert code == 1 and "stage 'teach' failed" in error and "no trained teacher at" in error


def test_batches_are_a_pure_function_of_the_step_and_split_across_workers():
    texts = [f"t{i}" for i in range(10)]
    whole = _batch_texts(texts, 4, 3, seed=1, rank=0, world_size=1)
    halves = _batch_texts(texts, 4, 3, seed=1, rank=0, world_size=2) + _batch_texts(texts, 4, 3, seed=1, rank=1, world_size=2)
    assert whole == halves and len(set(whole)) == 4
    assert _batch_texts(texts, 4, 3, seed=1, rank=0, world_size=1) == whole
    epoch = [t for step in range(2) for t in _batch_texts(texts, 4, step, seed=1, rank=0, world_size=1)]
    assert len(set(epoch)) == 8  # no text twice within an epoch
