"""Evaluation a user can trust (issue 18): full-size local tasks that follow MTEB's protocol, a quick mode whose
samples keep each task's distribution, reports that say which they are, and the response-oracle baseline with its
answer cache. Tiny data or the tiny random model; the tasks' real files where they are checked."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from components.evaluation import oracle as oracle_module
from components.evaluation.oracle import AnswerCache, OracleEmbedder
from components.evaluation.report import markdown_table
from components.evaluation.runner import TaskScore
from components.evaluation.tasks import (
    QUICK_TRAIN_TEXTS,
    LocalBanking77,
    LocalEmotion,
    LocalSciFact,
    LocalSICKR,
    lexical_neighbours,
    score_strata_rows,
    stratified_rows,
    subsample_retrieval_hard,
)
from components.generation import ResponseGenerator
from components.model import LLM2VecGen
from components.spec import EvaluationSpec, GenerationSpec, load_spec
from workflows import evaluate as evaluate_workflow
from workflows import run as run_workflow

DATA = Path("../shared/data")
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not available")


# ------------------------------------------------------------------------------------------------ sampling


def test_stratified_rows_keep_every_labels_share_and_at_least_one_row_of_each():
    labels = ["a"] * 90 + ["b"] * 9 + ["c"] * 1
    rows = stratified_rows(labels, 20, seed=0)
    assert rows == sorted(rows) and len(rows) == 20 and rows == stratified_rows(labels, 20, seed=0)
    counts = Counter(labels[i] for i in rows)
    assert counts["a"] in (17, 18) and counts["b"] in (1, 2) and counts["c"] == 1  # c's share rounds to 0: kept once
    assert stratified_rows(labels, None, 0) == stratified_rows(labels, 500, 0) == list(range(100))
    assert stratified_rows(labels, 20, seed=0) != stratified_rows(labels, 20, seed=1)


def test_score_strata_rows_take_one_row_from_each_stratum_of_the_gold_score():
    scores = np.random.default_rng(0).permutation(1000) / 1000  # 0.000 .. 0.999, shuffled
    rows = score_strata_rows(scores.tolist(), 10, seed=3)
    assert len(rows) == 10 and rows == sorted(rows)
    assert sorted(int(scores[i] * 10) for i in rows) == list(range(10))  # one pair from every decile
    assert score_strata_rows(scores.tolist(), None, 3) == list(range(1000))


def test_quick_retrieval_corpus_keeps_relevant_documents_lexical_neighbours_and_random_distractors():
    topics = ["apple orchard harvest", "volcano lava eruption", "violin concerto orchestra", "glacier ice melting"]
    corpus_ids = [f"d{i}" for i in range(40)]
    corpus_texts = [f"{topics[i % 4]} report number {i}" for i in range(40)]
    queries = ["q0", "q1"]
    query_texts = ["when is the apple harvest in the orchard", "how hot is volcano lava"]
    relevant = {"q0": {"d0": 1}, "q1": {"d1": 1}}
    assert lexical_neighbours(["volcano lava"], corpus_texts, 3) == [[1, 5, 9]]  # the volcano documents, best first
    kept, docs = subsample_retrieval_hard(queries, query_texts, relevant, corpus_ids, corpus_texts, limit=2,
                                          hard_negatives_per_query=3, distractors_per_query=1, seed=0)
    assert kept == queries
    hard = {"d4", "d8", "d12"} | {"d5", "d9", "d13"}  # the top-3 same-topic documents after each relevant one
    assert {"d0", "d1"} | hard <= set(docs) and len(docs) == 2 + 6 + 2
    assert subsample_retrieval_hard(queries, query_texts, relevant, corpus_ids, corpus_texts, None, 3, 1, 0) == (queries, corpus_ids)


# ---------------------------------------------------------------------------------- the tasks' own protocol


@needs_data
def test_full_size_tasks_are_the_data_mteb_evaluates_with_its_classification_protocol():
    sick = LocalSICKR(DATA)
    sick.load_data()
    assert len(sick.dataset["test"]) == 9927  # MTEB's SICK-R: all of SICK
    banking, emotion = LocalBanking77(DATA), LocalEmotion(DATA)
    banking.load_data()
    emotion.load_data()
    assert {split: len(rows) for split, rows in banking.dataset.items()} == {"train": 10003, "test": 3080}
    assert {split: len(rows) for split, rows in emotion.dataset.items()} == {"train": 16000, "test": 2000}
    # mteb's experiments: 10 draws of samples_per_label rows per label (8; Emotion 16, as MTEB sets it)
    assert (banking.samples_per_label, emotion.samples_per_label, banking.n_experiments) == (8, 16, 10)
    scifact = LocalSciFact(DATA)
    scifact.load_data()
    split = scifact.dataset["default"]["test"]
    assert len(split["corpus"]) == 5183 and len(split["queries"]) == 300


def mteb_draws(task, experiments: int) -> list[list[int]]:
    """The training rows of each classifier experiment, drawn as mteb's _evaluate_subset draws them."""
    idxs, draws = None, []
    for experiment in range(experiments):
        _, idxs, selected = task._undersample_data(task.dataset["train"], experiment, idxs)
        draws.append(selected)
    return draws


@needs_data
def test_quick_classification_runs_the_first_full_size_experiments_on_label_stratified_test_rows():
    task = LocalBanking77(DATA, limit=154)
    task.load_data()
    train, test = task.dataset["train"], task.dataset["test"]
    assert len(train) == 10003  # mteb draws each experiment's rows from the whole train split, as at full size
    assert task.n_experiments == QUICK_TRAIN_TEXTS // (8 * 77) == 2
    assert len(test) == 154 and set(Counter(test["label"]).values()) == {2} and len(set(test["label"])) == 77
    full = LocalBanking77(DATA)
    full.load_data()
    # the quick run's experiments are the full-size run's first ones (drawn as mteb draws them): the same rows
    assert mteb_draws(task, task.n_experiments) == mteb_draws(full, full.n_experiments)[: task.n_experiments]
    emotion = LocalEmotion(DATA, limit=100)
    emotion.load_data()
    assert emotion.n_experiments == 10  # 6 labels x 16: every experiment fits under the cap


# --------------------------------------------------------------------------------------------------- reports


def test_reports_say_whether_they_are_full_size_or_quick():
    assert EvaluationSpec().size_label == "full size"
    assert EvaluationSpec(limit=300).size_label == "quick mode (limit 300)"
    results = {"a": {"T": TaskScore("T", "STS", "m", 0.5, False, 0.0)}}
    assert markdown_table(results, size="quick mode (limit 300)").startswith("| task (quick mode (limit 300)) |")


# ---------------------------------------------------------------------------------------- the response oracle


@pytest.fixture
def tiny_folder(tmp_path, tiny_backbones) -> Path:
    model = LLM2VecGen.from_spec(load_spec("specs/tiny.yaml"), embedding_dim=16, backbone=tiny_backbones["llama"])
    return model.save(tmp_path / "tiny-model")


class Lengths:
    """A stand-in teacher: a text's vector is its length and its vowel count."""

    dimension = 2

    def embed(self, texts):
        return np.array([[len(t), sum(c in "aeiou" for c in t)] for t in texts], dtype=np.float32)


def test_answer_cache_generates_each_distinct_text_once_and_reuses_its_folder(tmp_path, tiny_spec, monkeypatch):
    generation = GenerationSpec(max_new_tokens=4, batch_size=4, shard_size=2)
    cache = AnswerCache(tmp_path / "oracle", tiny_spec.backbone, generation)
    texts = ["what is rain?", "name a colour", "what is rain?", "count to three"]
    answers = cache.answers(texts)
    assert len(answers) == 4 and answers[0] == answers[2] and cache.generated == 3
    # a fresh cache on the same folder (a rerun) reads every answer back and never generates
    monkeypatch.setattr(ResponseGenerator, "__call__", lambda self, shard: pytest.fail("generated on a rerun"))
    again = AnswerCache(tmp_path / "oracle", tiny_spec.backbone, generation)
    assert again.answers(texts) == answers and again.generated == 0
    # other decoding settings are other answers: a new folder
    other = AnswerCache(tmp_path / "oracle", tiny_spec.backbone, generation.model_copy(update={"max_new_tokens": 5}))
    assert other.key_inputs(texts) != again.key_inputs(texts)


def test_oracle_embeds_the_answer_to_the_prompted_text_with_the_teacher(tmp_path, tiny_spec):
    cache = AnswerCache(tmp_path / "oracle", tiny_spec.backbone, GenerationSpec(max_new_tokens=4, batch_size=4))
    oracle = OracleEmbedder(cache, Lengths(), {"query": "Answer: "})
    vectors = oracle.embed(["a cat", "a dog"], "Answer: ", 8)
    expected = Lengths().embed(cache.answers(["Answer: a cat", "Answer: a dog"]))
    assert np.array_equal(vectors, expected) and cache.generated == 2


@needs_data
def test_baselines_report_has_the_oracle_column_and_a_rerun_generates_nothing(tiny_folder, tmp_path, monkeypatch):
    evaluation = EvaluationSpec(tasks=["LocalSTSBenchmark"], limit=6, baselines=True, oracle_dir=str(tmp_path / "oracle"))
    generation = GenerationSpec(max_new_tokens=4, batch_size=4)
    report = evaluate_workflow.run_evaluation(tiny_folder, evaluation, tmp_path / "report", generation=generation)
    assert list(report["models"]) == ["llm2vec-gen", "teacher", "mean-pool", "last-token", "prompteol", "prompteol-chat",
                                      "echo", "oracle"]
    assert report["oracle_answers_generated"] == 12 and report["size"] == "quick mode (limit 6)"
    table = (tmp_path / "report" / "results.md").read_text()
    assert "| task (quick mode (limit 6)) |" in table and "| echo | oracle |" in table

    monkeypatch.setattr(ResponseGenerator, "__call__", lambda self, shard: pytest.fail("generated on a rerun"))
    again = evaluate_workflow.run_evaluation(tiny_folder, evaluation, tmp_path / "report2", generation=generation)
    assert again["oracle_answers_generated"] == 0
    assert again["models"]["oracle"]["LocalSTSBenchmark"]["score"] == report["models"]["oracle"]["LocalSTSBenchmark"]["score"]
    saved = json.loads((tmp_path / "report2" / "results.json").read_text())
    assert saved["oracle_answers_generated"] == 0


def test_cli_oracle_flags_and_the_spec_default_follow_the_baselines():
    args = evaluate_workflow.parse_args(["m", "--oracle", "--oracle-dir", "x"])
    evaluation = evaluate_workflow.evaluation_from_args(args, None)
    assert evaluation.with_oracle and not evaluation.baselines and evaluation.oracle_dir == "x"
    no = evaluate_workflow.evaluation_from_args(evaluate_workflow.parse_args(["m", "--baselines", "--no-oracle"]), None)
    assert no.baselines and not no.with_oracle
    assert no.training_free == ["mean-pool", "last-token", "prompteol", "prompteol-chat", "echo"]  # all by default
    some = evaluate_workflow.parse_args(["m", "--baselines", "--training-free", "echo, prompteol"])
    assert evaluate_workflow.evaluation_from_args(some, None).training_free == ["echo", "prompteol"]
    assert EvaluationSpec(baselines=True).with_oracle and not EvaluationSpec().with_oracle


@needs_data
def test_check_stage_prints_the_oracle_against_the_teacher_on_a_small_sample(tmp_path, capsys):
    spec = load_spec("specs/tiny.yaml", [f"output_dir={tmp_path / 'run'}", "evaluation.check_pairs=4",
                                         "generation.max_new_tokens=4"])
    result = run_workflow.check_oracle(spec)
    out = capsys.readouterr().out
    columns = ["teacher", "oracle", "mean-pool", "last-token", "prompteol", "prompteol-chat", "echo"]
    assert all(set(result[name]) == set(oracle_module.CHECK_TASKS) for name in columns)
    # 4 pairs x 2 texts x 2 STS tasks, and Emotion's 4 test rows and one classifier's 16 x 6 training tweets (at most)
    assert 16 + 4 < result["answers_generated"] <= 16 + 4 + 96
    assert "| LocalSICK-R |" in out and "| LocalEmotion |" in out and " vs teacher " in out
    # the verdict line is the pure function's, on the averages of the table
    means = {name: sum(result[name].values()) / len(oracle_module.CHECK_TASKS) for name in columns}
    can_pay, line = oracle_module.distillation_verdict(means["oracle"], {n: means[n] for n in columns[2:]})
    assert result["can_pay"] == can_pay and result["verdict"] == line and line in out
    assert result["best_baseline"] == max(columns[2:], key=means.get)
    # the spec's training-free baselines are the ones compared (the answers are cached: nothing is generated again)
    one = load_spec("specs/tiny.yaml", [f"output_dir={tmp_path / 'run'}", "evaluation.check_pairs=4",
                                        "generation.max_new_tokens=4", "evaluation.training_free=[last-token]"])
    only = run_workflow.check_oracle(one)
    assert only["best_baseline"] == "last-token" and "mean-pool" not in only and only["answers_generated"] == 0
    assert only["last-token"] == result["last-token"] and "training-free last-token" in only["verdict"]
    capsys.readouterr()
    skipped = load_spec("specs/tiny.yaml", [f"output_dir={tmp_path / 'run'}", "evaluation.check_pairs=0"])
    assert run_workflow.check_oracle(skipped) is None and "pre-flight: skipped" in capsys.readouterr().out
    absent = load_spec("specs/tiny.yaml", [f"output_dir={tmp_path / 'run'}", f"evaluation.data_dir={tmp_path / 'none'}"])
    assert run_workflow.check_oracle(absent) is None
    assert capsys.readouterr().out.strip().splitlines() == [
        f"pre-flight: skipped (no stsbenchmark, sick, emotion in {tmp_path / 'none'})"]


class NoiseTeacher:
    """A teacher whose vector of a text is noise seeded by the text: its oracle carries nothing about the inputs."""

    dimension = 16

    def embed(self, texts):
        import hashlib

        return np.stack([np.random.default_rng(int(hashlib.sha256(t.encode()).hexdigest()[:8], 16)).standard_normal(16)
                         for t in texts]).astype(np.float32)


@needs_data
def test_the_pre_flight_says_cannot_when_the_answers_embed_as_noise(tmp_path, capsys):
    spec = load_spec("specs/tiny.yaml", [f"output_dir={tmp_path / 'run'}", "evaluation.check_pairs=30",
                                         "generation.max_new_tokens=2"])
    result = oracle_module.check_oracle(spec, teacher=NoiseTeacher())
    assert not result["can_pay"] and result["verdict"].startswith("pre-flight: distillation CANNOT beat")
    assert result["verdict"] in capsys.readouterr().out


def test_the_verdict_says_distillation_cannot_beat_a_baseline_that_the_oracle_is_below():
    can, line = oracle_module.distillation_verdict(0.55, {"mean-pool": 0.40, "prompteol": 0.61, "echo": 0.50})
    assert not can and "CANNOT beat the training-free prompteol" in line and "6.0 points below" in line
    assert "55.0" in line and "61.0" in line
    tie, _ = oracle_module.distillation_verdict(0.61, {"prompteol": 0.61})
    assert not tie  # equal to the baseline: a student capped there cannot beat it
    can, line = oracle_module.distillation_verdict(0.70, {"mean-pool": 0.40, "echo": 0.52})
    assert can and "can beat the training-free echo" in line and "18.0 points above" in line
    with pytest.raises(ValueError, match="at least one"):
        oracle_module.distillation_verdict(0.5, {})


class Words:
    """A lexical teacher: a text's vector is its bag of lower-cased words, hashed into 512 counts (a classic
    training-free embedder that carries what the words of a text say, and nothing else)."""

    dimension = 512

    def embed(self, texts):
        import re
        import zlib

        vectors = np.zeros((len(texts), self.dimension), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                vectors[row, zlib.crc32(word.encode()) % self.dimension] += 1
        return vectors


def answer_by_repeating_the_question(oracle_dir: Path) -> int:
    """Make every cached answer under `oracle_dir` the question itself, in the cache's own files (what a backbone
    that answers by repeating its input would have written there); returns the number of answers rewritten."""
    from components import storage
    from components.stages import ShardedOutput

    rewritten = 0
    for folder in sorted(path for path in oracle_dir.iterdir() if path.is_dir()):
        output = ShardedOutput.load(folder)  # a complete answer list (the check wrote it whole)
        for shard in range(output.num_shards):
            table = storage.read_parquet(output.shard_path(shard))
            table = table.set_column(table.schema.get_field_index("response"), "response", table.column("query"))
            output.write_shard(shard, table)
            rewritten += table.num_rows
    return rewritten


def printed_averages(out: str) -> dict[str, float]:
    """The average row of the pre-flight's printed table, by column label."""
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("| task ("))
    average = next(line for line in lines if line.startswith("| **average**"))
    labels = [cell.strip() for cell in header.strip("|").split("|")][3:]
    cells = [cell.strip().strip("*") for cell in average.strip("|").split("|")][3:]
    return dict(zip(labels, map(float, cells), strict=True))


@needs_data
def test_the_pre_flight_says_can_when_the_answers_carry_the_inputs_to_a_teacher_that_reads_them(tmp_path, capsys):
    """The twin of the CANNOT test, on the tiny backbone with a lexical teacher and nothing mocked: the tiny random
    backbone's own answers (two tokens of noise) carry nothing of the inputs, and the verdict is CANNOT; seeded into
    the answer cache, answers that repeat the question carry all of it, so the oracle is the teacher on the prompted
    inputs, bag-of-words beats the random backbone's readouts on STS and Emotion, and the verdict flips to can, with
    nothing changed but the answers."""
    oracle_dir = tmp_path / "oracle"
    spec = load_spec("specs/tiny.yaml", [f"output_dir={tmp_path / 'run'}", "evaluation.check_pairs=30",
                                         "generation.max_new_tokens=2", f"evaluation.oracle_dir={oracle_dir}"])
    baselines = ["mean-pool", "last-token", "prompteol", "prompteol-chat", "echo"]
    noise = oracle_module.check_oracle(spec, teacher=Words())
    assert noise["answers_generated"] > 0 and not noise["can_pay"]
    assert noise["verdict"].startswith("pre-flight: distillation CANNOT beat")
    capsys.readouterr()

    assert answer_by_repeating_the_question(oracle_dir) == noise["answers_generated"]
    echo = oracle_module.check_oracle(spec, teacher=Words())
    out = capsys.readouterr().out
    assert echo["answers_generated"] == 0  # every answer came from the seeded cache
    assert echo["can_pay"] and echo["verdict"].startswith("pre-flight: distillation can beat the training-free")
    assert echo["verdict"] in out.splitlines()
    # the printed table says the same: the oracle's average is above every training-free baseline's
    printed = printed_averages(out)
    best = max(baselines, key=printed.get)
    assert list(printed) == ["teacher", "oracle", *baselines] and echo["best_baseline"] == best
    assert printed["oracle"] > printed[best] and f"training-free {best} here" in echo["verdict"]
    assert f"oracle scores {printed['oracle']:.1f}, " in echo["verdict"]  # the verdict quotes the table's averages
    assert f"points above {best}'s {printed[best]:.1f} " in echo["verdict"]
    # the teacher and the baselines do not read the answers: only the oracle moved
    assert all(echo[name] == noise[name] for name in ["teacher", *baselines])
    assert np.mean(list(echo["oracle"].values())) > np.mean(list(noise["oracle"].values()))
