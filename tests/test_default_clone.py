"""The embedded default from a fresh clone: its training queries ship in the repository, and `evaluation.suite: auto`
picks the local tasks where their files are, their public MTEB copies when the hub is reachable, else nothing (one
line, the job goes on). No test reaches the network: reachability is passed in, or the environment says offline."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest

from components.evaluation.availability import (
    HUB_COPIES,
    LOCAL_FILES,
    choose_auto_suite,
    hub_reachable,
    missing_files,
)
from components.evaluation.suites import LOCAL_TASKS
from components.queries import load_queries
from components.spec import load_spec
from workflows import evaluate as evaluate_workflow
from workflows.run import summary

DATA = Path("../shared/data")
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not available")
DEFAULT = "specs/smollm2-135m.yaml"


def never_called() -> bool:
    raise AssertionError("the hub was probed although every local file is present")


# ------------------------------------------------------------------------------------ the shipped queries


def test_the_default_reads_only_queries_shipped_in_the_repository():
    spec = load_spec(DEFAULT)
    paths = [Path(source.path) for source in spec.data.sources]
    assert paths and all(not path.is_absolute() and ".." not in path.parts and path.is_file() for path in paths)
    selection = load_queries(spec.data)
    assert len(selection.texts) == spec.data.limit
    # every source contributes (weights 1.0 and 0.5 of 256 queries), nothing is skipped
    assert all(source.selected > 0 for source in selection.report)
    assert selection.report_dict()["skipped"] == {}


def test_shipped_queries_are_small_questions_only_with_their_licenses():
    folder = Path("data/queries")
    readme = (folder / "README.md").read_text()
    assert "CC BY-SA 3.0" in readme and "MIT" in readme
    assert "MIT License" in (folder / "LICENSE-gsm8k").read_text()
    total = 0
    for name in ("nq_open.jsonl", "gsm8k.jsonl"):
        rows = [json.loads(line) for line in (folder / name).read_text().splitlines()]
        assert len(rows) >= 1000 and all(set(row) == {"question"} and row["question"].strip() for row in rows)
        total += (folder / name).stat().st_size
    assert total < 1_000_000


# ------------------------------------------------------------------------------ the three evaluation cases


@needs_data
def test_auto_runs_the_local_suite_where_its_files_are_without_probing_the_hub():
    choice = choose_auto_suite(DATA, online=never_called)
    assert choice.tasks == LOCAL_TASKS and choice.kind == "local" and not choice.skipped
    assert choice.line == f"local suite: {len(LOCAL_TASKS)} tasks from {DATA} (offline)"


def test_auto_without_files_and_offline_is_skipped_with_one_line(tmp_path):
    choice = choose_auto_suite(tmp_path, online=lambda: False)
    assert choice.skipped and choice.kind == "skipped" and choice.left_out == LOCAL_TASKS
    assert "\n" not in choice.line and choice.line.startswith("evaluation skipped: no local task files under")
    assert "not reachable" in choice.line


def test_auto_without_files_and_online_chooses_the_public_mteb_copies(tmp_path):
    import mteb

    choice = choose_auto_suite(tmp_path, online=lambda: True)
    assert choice.kind == "hub" and choice.tasks == list(HUB_COPIES.values())
    # those names are real mteb tasks (metadata only: nothing is downloaded), of the same type as the local ones
    from components.evaluation.runner import LOCAL_TASK_CLASSES

    for local, public in HUB_COPIES.items():
        assert mteb.get_task(public).metadata.type == LOCAL_TASK_CLASSES[local].metadata.type
    assert set(choice.left_out) == set(LOCAL_TASKS) - set(HUB_COPIES)
    assert "public MTEB tasks from the hub" in choice.line


@needs_data
def test_auto_with_some_files_runs_those_locally_and_the_rest_from_the_hub(tmp_path):
    for name in LOCAL_FILES["LocalSTSBenchmark"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(DATA / name, tmp_path / name)
    assert missing_files("LocalSTSBenchmark", tmp_path) == [] and missing_files("LocalSciFact", tmp_path)
    online = choose_auto_suite(tmp_path, online=lambda: True)
    assert online.kind == "mixed" and online.tasks[0] == "LocalSTSBenchmark" and "STSBenchmark" not in online.tasks
    assert "SciFact" in online.tasks
    offline = choose_auto_suite(tmp_path, online=lambda: False)
    assert offline.tasks == ["LocalSTSBenchmark"] and offline.kind == "local" and "offline" in offline.line


def test_local_files_name_every_local_task_and_lie_under_its_dataset_path():
    from components.evaluation.runner import LOCAL_TASK_CLASSES

    assert list(LOCAL_FILES) == LOCAL_TASKS
    for task, cls in LOCAL_TASK_CLASSES.items():
        own = cls.metadata.dataset["path"].removeprefix("local://")
        assert any(name == own or name.startswith(own.rstrip("/") + "/") for name in LOCAL_FILES[task]), task


def test_hub_reachable_is_false_at_once_when_the_environment_says_offline(monkeypatch):
    def no_connection(*args, **kwargs):
        raise AssertionError("connected although HF_HUB_OFFLINE is set")

    monkeypatch.setattr(socket, "create_connection", no_connection)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_reachable() is False


def test_hub_reachable_probes_hf_endpoint_once(monkeypatch):
    calls = []

    class Connection:
        def close(self):
            pass

    def fake(address, timeout):
        calls.append((address, timeout))
        if address[0] == "down.example":
            raise OSError("unreachable")
        return Connection()

    monkeypatch.setattr(socket, "create_connection", fake)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror.example:8443")
    assert hub_reachable(timeout_s=0.5) is True
    monkeypatch.setenv("HF_ENDPOINT", "http://down.example")
    assert hub_reachable() is False
    assert calls == [(("mirror.example", 8443), 0.5), (("down.example", 80), 3.0)]


# ----------------------------------------------------------------------- the evaluate stage and the summary


def test_the_evaluate_stage_skips_with_its_line_and_the_summary_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = load_spec(DEFAULT, [f"output_dir={tmp_path / 'run'}", f"evaluation.data_dir={tmp_path / 'nothing'}"])
    assert spec.evaluation.suite == "auto"
    # no model is loaded when nothing is chosen: the folder does not even exist
    result = evaluate_workflow.stage_evaluate(spec, {"train": {"model_dir": str(tmp_path / "absent" / "model")}})
    assert result["evaluation"].startswith("evaluation skipped:") and "report" not in result
    text = summary(spec, {"evaluate": result}, {"evaluate": 0.1})
    assert f"  evaluation   {result['evaluation']}" in text.splitlines()


def test_resolve_auto_fills_in_the_chosen_tasks_and_leaves_other_suites_alone(tmp_path):
    spec = load_spec(DEFAULT, [f"evaluation.data_dir={tmp_path}", "evaluation.tasks=[]"])  # auto over the local suite
    resolved, choice = evaluate_workflow.resolve_auto(spec.evaluation, online=lambda: True)
    assert resolved.tasks == list(HUB_COPIES.values()) and choice.kind == "hub"
    assert evaluate_workflow.suite_tasks(resolved) == list(HUB_COPIES.values())
    skipped, choice = evaluate_workflow.resolve_auto(spec.evaluation, online=lambda: False)
    assert choice.skipped and skipped.suite == "none" and evaluate_workflow.suite_tasks(skipped) == []
    local = load_spec("specs/tiny.yaml").evaluation
    assert evaluate_workflow.resolve_auto(local, online=never_called) == (local, None)
    # auto over a list of local tasks chooses among those: their hub copies here, nothing else
    sts = load_spec(DEFAULT, [f"evaluation.data_dir={tmp_path}", "evaluation.tasks=[LocalSTSBenchmark]"]).evaluation
    resolved, choice = evaluate_workflow.resolve_auto(sts, online=lambda: True)
    assert resolved.tasks == ["STSBenchmark"] and choice.kind == "hub"


@needs_data
def test_the_default_evaluates_full_size_sts_b_locally_with_the_baselines_beside_the_model():
    evaluation = load_spec(DEFAULT).evaluation
    resolved, choice = evaluate_workflow.resolve_auto(evaluation, online=never_called)
    assert resolved.tasks == ["LocalSTSBenchmark"] and choice.line == f"local tasks LocalSTSBenchmark from {DATA} (offline)"
    assert evaluation.limit is None and evaluation.baselines and not evaluation.with_oracle  # full size; oracle: pre-flight
    assert {"mean-pool", "last-token", "prompteol"} <= set(evaluation.training_free) and evaluation.check_pairs > 0


def test_cli_suite_auto_with_nothing_to_run_exits_2_with_the_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = evaluate_workflow.main([str(tmp_path / "model"), "--suite", "auto", "--data-dir", str(tmp_path)])
    assert code == 2
    assert "evaluation skipped: no local task files under" in capsys.readouterr().err
