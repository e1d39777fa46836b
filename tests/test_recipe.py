"""specs/qwen.yaml and its Qwen2.5 / Llama variants state the official recipe, and every number in them says where it
comes from."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.spec import load_spec

RECIPES = ["specs/qwen.yaml", "specs/qwen2.5.yaml", "specs/llama3.2.yaml"]


@pytest.mark.parametrize("path", RECIPES)
def test_every_number_of_a_recipe_has_a_comment(path):
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.lstrip().startswith(("#", "-")) or ":" not in line:  # comments, list items (data sources)
            continue
        raw = line.split("#", 1)[0].split(":", 1)[1].strip()
        if not raw or raw.startswith(("{", "[", '"')):  # a section, or a flow mapping of strings (data sources)
            continue
        value = yaml.safe_load(raw)
        if isinstance(value, int | float) and not isinstance(value, bool):
            assert "#" in line, f"{path}:{number}: a number without a comment: {line.strip()}"


def test_qwen3_recipe_is_the_official_v2_recipe():
    spec = load_spec("specs/qwen.yaml")
    assert (spec.tokens.thought, spec.tokens.compression) == (0, 10)
    training = spec.training
    assert (training.lr, training.batch_size, training.warmup_steps) == (3e-4, 32, 100)
    assert (training.schedule_steps, training.max_steps) == (20000, 5000)
    assert (training.precision, training.max_response_tokens, spec.model.max_query_tokens) == ("bf16", 512, 512)
    assert (spec.generation.max_new_tokens, spec.generation.enable_thinking) == (500, False)
    assert (spec.loss.reconstruction, spec.loss.alignment, spec.loss.alignment_kind) == (1.0, 1.0, "mse")
    assert spec.backbone.dtype == "bfloat16" and spec.model.prompts == "generative" and spec.evaluation.suite == "paper"
    # The same-size unsupervised LLM2Vec teacher, unnormalised mean pooling, as the official code aligns to.
    assert (spec.teacher.kind, spec.teacher.name) == ("llm2vec", "McGill-NLP/LLM2Vec-Qwen3-17B-mntp")
    assert spec.teacher.adapters == ["McGill-NLP/LLM2Vec-Qwen3-17B-mntp-unsup-simcse"]
    assert (spec.teacher.pooling, spec.teacher.normalize, spec.teacher.merge_adapters) == ("mean", False, False)
    # The training pairs: the official generations of this backbone from the hub, passed through as given, 160,000
    # of them (5,000 steps x 32); nothing read from ../shared.
    [source] = spec.data.sources
    assert (source.path, source.format, source.split) == ("McGill-NLP/llm2vec-gen-tulu", "hf", "Qwen3_17B")
    assert (source.text_field, source.response_field) == ("question", "answer") and spec.data.given_responses
    assert (spec.data.limit, spec.data.dedup) == (160000, False)
    assert spec.data.limit == training.max_steps * training.batch_size
    # Self-generated answers (another source) would sample as the official response_generation.py does.
    assert spec.generation.sampling == "model_default"
    # The official schedule and memory setting: linear decay with step / warmup, gradient checkpointing.
    assert (training.schedule, training.gradient_checkpointing) == ("linear", True)


@pytest.mark.parametrize(("path", "backbone"), [("specs/qwen2.5.yaml", "Qwen/Qwen2.5-1.5B-Instruct"),
                                                ("specs/llama3.2.yaml", "meta-llama/Llama-3.2-1B-Instruct")])
def test_qwen25_and_llama_variants_differ_only_in_backbone_data_split_and_learning_rate(path, backbone):
    base, variant = load_spec("specs/qwen.yaml").to_dict(), load_spec(path).to_dict()
    assert variant["backbone"]["name"] == backbone and variant["training"]["lr"] == 5e-4
    differ = {section for section in base if base[section] != variant[section]}
    assert differ == {"name", "description", "backbone", "teacher", "data", "training", "tracking"}
    # The data differ only in the split: the official generations of this backbone.
    [base_source], [source] = base["data"].pop("sources"), variant["data"].pop("sources")
    assert base["data"] == variant["data"] and {k for k in source if source[k] != base_source[k]} == {"split"}
    # Each backbone has its own same-size LLM2Vec teacher; nothing else of the teacher section differs.
    assert {k for k in base["teacher"] if base["teacher"][k] != variant["teacher"][k]} == {"name", "adapters"}
    assert variant["teacher"]["adapters"] == [variant["teacher"]["name"] + "-unsup-simcse"]
    assert {k for k in base["training"] if base["training"][k] != variant["training"][k]} == {"lr"}


def test_print_spec_shows_the_resolved_recipe():
    result = subprocess.run([sys.executable, "-m", "workflows.run", "specs/qwen.yaml", "--print-spec"],
                            capture_output=True, text=True, timeout=120, check=True)
    printed = yaml.safe_load(result.stdout)
    assert printed["tokens"] == {"thought": 0, "compression": 10}
    assert printed["training"]["schedule_steps"] == 20000 and printed["training"]["max_steps"] == 5000
    assert printed["model"]["prompts"] == "generative"
    assert printed["training"]["schedule"] == "linear" and printed["training"]["gradient_checkpointing"] is True
    assert printed["data"]["limit"] == 160000 and printed["data"]["sources"][0]["response_field"] == "answer"
    assert printed["generation"]["sampling"] == "model_default"


@pytest.mark.parametrize(("path", "split"), [("specs/qwen.yaml", "Qwen3-1.7B"), ("specs/qwen2.5.yaml", "Qwen2.5-1.5B-Instruct"),
                                             ("specs/llama3.2.yaml", "Llama-3.2-1B-Instruct")])
def test_the_data_split_is_the_official_safe_split_name_of_the_backbone(path, split):
    # official llm2vec_gen/dataset/utils.py safe_split_name applied to conf/data/<model>.yaml dataset_name
    import re

    name = re.sub(r"[^a-zA-Z0-9_.]", "_", split).replace(".", "").strip("_")
    assert load_spec(path).data.sources[0].split == name
