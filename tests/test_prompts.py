"""Prompt sets (components/prompts.py): the official generative instructions on the query side, the passage prefix on
the document side, bare texts; carried by a model folder and used by the mteb encoder. Offline, tiny models only."""

from __future__ import annotations

import json
import os

import mteb
import pytest
from mteb.types import PromptType

from components.evaluation.encoders import GenEmbedder, MtebEncoder, as_mteb, resolve_prompt
from components.evaluation.runner import LOCAL_TASK_CLASSES
from components.model import LLM2VecGen
from components.prompts import (
    BRIGHT_BY_TASK,
    OFFICIAL_BY_TASK,
    PASSAGE_PREFIX,
    PROMPT_SETS,
    generative_prompts,
    prompt_set,
)
from components.spec import SpecError, load_spec
from workflows import evaluate as evaluate_workflow

GENERATIVE = generative_prompts()


def metadata(name: str):
    return LOCAL_TASK_CLASSES[name].metadata if name in LOCAL_TASK_CLASSES else mteb.get_task(name).metadata


@pytest.mark.parametrize(
    ("task", "side", "expected"),
    [
        # the two examples, verbatim from the official generative.json
        ("STSBenchmark", None, "Generate text that is semantically similar to this text: "),
        ("Robust04InstructionRetrieval", PromptType.query, "Generate a relevant document that answers this query: "),
        # a named retrieval task: its own instruction for queries, the passage prefix for documents
        ("SciFact", PromptType.query, OFFICIAL_BY_TASK["SciFact"] + " "),
        ("SciFact", PromptType.document, "Summarize the following passage: "),
        ("ArguAna", PromptType.document, PASSAGE_PREFIX),
        # where the official set differs per task: SICK-R says "sentence", clustering tasks name their own genre
        ("SICK-R", None, "Generate a sentence that is semantically similar to this sentence: "),
        ("TwentyNewsgroupsClustering.v2", None, OFFICIAL_BY_TASK["TwentyNewsgroupsClustering.v2"] + " "),
        # BRIGHT per domain
        ("BrightBiologyRetrieval", PromptType.query,
         "Given a biology post, generate relevant passages that help answer the post: "),
        ("BrightLeetcodeRetrieval", PromptType.query,
         "Given a coding problem, generate relevant examples that help answer the problem: "),
        ("BrightBiologyRetrieval", PromptType.document, PASSAGE_PREFIX),
        # our local copies read the instruction of the official task they copy
        ("LocalSTSBenchmark", None, "Generate text that is semantically similar to this text: "),
        ("LocalSciFact", PromptType.query, OFFICIAL_BY_TASK["SciFact"] + " "),
        ("LocalSciFact", PromptType.document, PASSAGE_PREFIX),
        ("LocalBanking77", None, OFFICIAL_BY_TASK["Banking77Classification"] + " "),
        ("AdvBenchIR", PromptType.query, "Generate a relevant document that answers this query: "),
        # a task the set does not name falls back to its type's instruction
        ("LocalTrecQA", PromptType.query, "Generate a relevant document that answers this query: "),
        ("LocalTrecQA", PromptType.document, PASSAGE_PREFIX),
        ("LocalMRPC", None, "Generate text that is semantically similar to this text: "),
        ("NQ", PromptType.query, "Generate a relevant document that answers this query: "),
    ],
)
def test_generative_set_gives_the_official_instruction_per_task_and_side(task, side, expected):
    assert resolve_prompt(GENERATIVE, metadata(task), side) == expected


def test_every_mteb_eng_v2_task_and_bright_domain_has_its_own_official_instruction():
    names = [task.metadata.name for task in mteb.get_benchmark("MTEB(eng, v2)").tasks]
    assert len(names) == 41 and set(names) <= set(OFFICIAL_BY_TASK)
    assert len(BRIGHT_BY_TASK) == 12
    for name in BRIGHT_BY_TASK:
        assert mteb.get_task(name).metadata.type == "Retrieval"
    # every instruction ends with exactly one space, so that "instruction text" reads as the official join does
    assert all(text.endswith(" ") and not text.endswith("  ") for text in GENERATIVE.values())


def test_bare_is_no_instruction_and_an_explicit_mapping_stays_as_it_is():
    assert prompt_set("bare") == {} and resolve_prompt(prompt_set("bare"), metadata("LocalSciFact"), PromptType.query) == ""
    assert prompt_set({"query": "Q: "}) == {"query": "Q: "}
    assert prompt_set("generative") == GENERATIVE and prompt_set("generative") is not PROMPT_SETS["generative"]
    with pytest.raises(ValueError, match="unknown prompt set 'nope'"):
        prompt_set("nope")


def test_spec_names_a_prompt_set_and_the_model_folder_carries_it(tmp_path, tiny_backbones):
    spec = load_spec("specs/tiny.yaml", ["model.prompts=generative"])
    assert spec.model.prompts == "generative" and spec.model.prompt_mapping == GENERATIVE
    saved = LLM2VecGen.from_spec(spec, embedding_dim=16, backbone=tiny_backbones["llama"]).save(tmp_path / "m")
    assert json.loads((saved / "llm2vec_gen.json").read_text())["prompts"] == GENERATIVE
    encoder = as_mteb(LLM2VecGen.load(saved, backbone=tiny_backbones["llama"]))
    assert resolve_prompt(encoder.model_prompts, metadata("LocalSciFact"), PromptType.document) == PASSAGE_PREFIX
    bare = load_spec("specs/tiny.yaml", ["model.prompts=bare"])
    assert LLM2VecGen.from_spec(bare, embedding_dim=16, backbone=tiny_backbones["llama"]).config.prompts == {}


@pytest.mark.parametrize("value", ["generativ", "3"])
def test_an_unknown_prompt_set_is_a_spec_error_naming_the_key_and_the_sets(value):
    with pytest.raises(SpecError, match=r"model\.prompts: must be a mapping or one of the prompt sets bare, generative"):
        load_spec("specs/tiny.yaml", [f"model.prompts={value}"])


def test_encoder_prefixes_queries_with_the_instruction_and_documents_with_the_passage_prefix(tiny_model_for_prompts):
    calls = []

    class Recording(GenEmbedder):
        def embed(self, texts, prompt, batch_size):
            calls.append(prompt)
            return super().embed(texts, prompt, batch_size)

    encoder = MtebEncoder(Recording(tiny_model_for_prompts, prompts=prompt_set("generative")))
    scifact = metadata("LocalSciFact")
    for side in (PromptType.query, PromptType.document):
        encoder.encode([{"text": ["a claim about cells"]}], task_metadata=scifact, hf_split="test", hf_subset="default",
                       prompt_type=side)
    assert calls == [OFFICIAL_BY_TASK["SciFact"] + " ", PASSAGE_PREFIX]
    # the prefix changes what is embedded (the model reads "instruction + text")
    with_prompt = tiny_model_for_prompts.encode(["a claim"], prompt=PASSAGE_PREFIX)
    assert not (with_prompt == tiny_model_for_prompts.encode(["a claim"], prompt="")).all()


@pytest.fixture
def tiny_model_for_prompts(tiny_backbones) -> LLM2VecGen:
    return LLM2VecGen.from_spec(load_spec("specs/tiny.yaml"), embedding_dim=16, backbone=tiny_backbones["llama"])


def test_evaluate_prompts_option_reads_a_set_or_a_json_file(tmp_path, capsys):
    assert evaluate_workflow.load_prompts("generative") == GENERATIVE
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"query": "Q: "}))
    assert evaluate_workflow.load_prompts(str(path)) == {"query": "Q: "}
    path.write_text(json.dumps({"query": 3}))
    with pytest.raises(ValueError, match="expected a JSON object of strings"):
        evaluate_workflow.load_prompts(str(path))
    assert evaluate_workflow.main([str(tmp_path / "model"), "--prompts", "nope"]) == 2
    assert "neither a prompt set (bare, generative) nor a JSON file" in capsys.readouterr().err


@pytest.mark.skipif(not os.path.isdir("../shared/data"), reason="../shared/data is not available")
def test_evaluate_runs_prompt_sets_side_by_side_from_one_model_load(tmp_path, tiny_model_for_prompts):
    folder = tiny_model_for_prompts.save(tmp_path / "m")
    output = tmp_path / "report"
    code = evaluate_workflow.main([str(folder), "--suite", "LocalSICK-R,LocalSciFact", "--limit", "6",
                                   "--prompts", "bare,generative", "--output", str(output)])
    assert code == 0
    report = json.loads((output / "results.json").read_text())
    assert list(report["models"]) == ["llm2vec-gen-bare", "llm2vec-gen-generative"]
    scores = {label: report["models"][label]["LocalSICK-R"]["score"] for label in report["models"]}
    assert scores["llm2vec-gen-bare"] != scores["llm2vec-gen-generative"]  # the instruction changes the embeddings
    assert report["prompts"] == "bare,generative"
    assert "| LocalSICK-R | STS | cosine_spearman |" in (output / "results.md").read_text()
