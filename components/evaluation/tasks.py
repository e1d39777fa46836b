"""Local mteb tasks: MTEB-style datasets read from files under evaluation.data_dir, never from the hub.

Each task is an mteb task class (AbsTaskSTS, AbsTaskClassification, ...) whose `load_data` reads local files, so
mteb's own evaluators compute every score. `limit` caps what each task encodes at about N items, sampled
deterministically with `seed`:

    STS, pair classification   N pairs
    classification             N training rows (the classifier's pool) and N test rows
    clustering                 N texts (without a limit, 2,048, as MTEB's fast clustering tasks do)
    retrieval                  N queries; the corpus keeps their relevant documents plus distractors_per_query * N others
    reranking                  whole queries, while their candidate pairs add up to at most N (at least one query)

The readers are small functions returning plain rows, so that the file formats are testable without mteb.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict
from mteb.abstasks.classification import AbsTaskClassification
from mteb.abstasks.clustering import AbsTaskClustering
from mteb.abstasks.pair_classification import AbsTaskPairClassification
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.sts import AbsTaskSTS
from mteb.abstasks.task_metadata import TaskMetadata

# ------------------------------------------------------------------------------------------------ sampling


def sample_rows(count: int, limit: int | None, seed: int) -> list[int]:
    """Indices of `limit` rows out of `count`, in their original order; all rows without a limit."""
    if limit is None or limit >= count:
        return list(range(count))
    return sorted(np.random.default_rng(seed).choice(count, size=limit, replace=False).tolist())


def subsample_retrieval(
    query_ids: Sequence[str],
    relevant: dict[str, dict[str, int]],
    corpus_ids: Sequence[str],
    limit: int | None,
    distractors_per_query: int,
    seed: int,
) -> tuple[list[str], list[str]]:
    """(kept query ids, kept corpus ids): `limit` queries, every document relevant to them, and
    distractors_per_query * len(kept queries) other documents sampled from the rest of the corpus."""
    if limit is None or limit >= len(query_ids):
        return list(query_ids), list(corpus_ids)
    queries = [query_ids[i] for i in sample_rows(len(query_ids), limit, seed)]
    needed = {doc for query in queries for doc in relevant.get(query, {})}
    others = [doc for doc in corpus_ids if doc not in needed]
    extra = {others[i] for i in sample_rows(len(others), distractors_per_query * len(queries), seed)}
    return queries, [doc for doc in corpus_ids if doc in needed or doc in extra]


def whole_groups_up_to(sizes: Sequence[int], limit: int | None, seed: int) -> list[int]:
    """Indices of groups, in random order, taken while their sizes add up to at most `limit` (at least one group)."""
    if limit is None:
        return list(range(len(sizes)))
    kept, total = [], 0
    for index in np.random.default_rng(seed).permutation(len(sizes)).tolist():
        if kept and total + sizes[index] > limit:
            break
        kept.append(index)
        total += sizes[index]
    return sorted(kept)


# ------------------------------------------------------------------------------------------------- readers


def read_sts_benchmark(path: Path) -> list[dict[str, Any]]:
    """STS-B: tab-separated genre, file, year, id, score, s1, s2 (some rows carry extra fields: the first 7 count).
    Not read with csv: the sentences contain unbalanced quotes."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        fields = line.split("\t")
        if len(fields) >= 7:
            rows.append({"sentence1": fields[5], "sentence2": fields[6], "score": float(fields[4])})
    return rows


def read_sick(path: Path) -> list[dict[str, Any]]:
    """SICK: a header, then pair_ID, sentence_A, sentence_B, relatedness_score (1-5), entailment_judgment."""
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    return [
        {"sentence1": fields[1], "sentence2": fields[2], "score": float(fields[3])}
        for fields in (line.split("\t") for line in lines)
        if len(fields) >= 4
    ]


def read_banking77(path: Path) -> list[dict[str, str]]:
    """Banking77: csv `text`, `category` (quoted texts may span lines, hence the csv module)."""
    with path.open(encoding="utf-8", newline="") as handle:
        return [{"text": row["text"], "label": row["category"]} for row in csv.DictReader(handle)]


def read_emotion(path: Path) -> list[dict[str, str]]:
    """Emotion: a header `text;label_name`, then one tweet a line; the label follows the LAST ';'."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:
        text, sep, label = line.rpartition(";")
        if sep:
            rows.append({"text": text, "label": label})
    return rows


def read_stc2(texts: Path, labels: Path) -> list[dict[str, Any]]:
    """STC2 clustering: one text a line, and its label on the same line of the aligned *_gnd.txt."""
    lines = texts.read_text(encoding="utf-8").splitlines()
    gold = labels.read_text(encoding="utf-8").split()
    if len(lines) != len(gold):
        raise ValueError(f"{texts}: {len(lines)} texts but {len(gold)} labels in {labels}")
    return [{"sentences": text.strip(), "labels": label} for text, label in zip(lines, gold, strict=True)]


def read_mrpc(path: Path) -> list[dict[str, Any]]:
    """MRPC: UTF-8 with BOM; a header, then Quality (1 = paraphrase), #1 ID, #2 ID, #1 String, #2 String."""
    lines = path.read_text(encoding="utf-8-sig").splitlines()[1:]
    return [
        {"sentence1": fields[3], "sentence2": fields[4], "labels": int(fields[0])}
        for fields in (line.split("\t") for line in lines)
        if len(fields) >= 5
    ]


def read_trecqa(path: Path) -> list[dict[str, Any]]:
    """TREC-QA (Wang 2007): csv `qtext`, `label` (1 = the sentence answers the question), `atext`."""
    with path.open(encoding="utf-8", newline="") as handle:
        return [{"question": row["qtext"], "answer": row["atext"], "label": int(row["label"])} for row in csv.DictReader(handle)]


def read_beir(folder: Path, split: str = "test") -> tuple[dict[str, dict[str, str]], dict[str, str], dict[str, dict[str, int]]]:
    """A BEIR folder: (corpus id -> {title, text}, query id -> text, query id -> {corpus id: relevance})."""
    corpus = {}
    with (folder / "corpus.jsonl").open(encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            corpus[str(row["_id"])] = {"title": row.get("title") or "", "text": row.get("text") or ""}
    with (folder / "queries.jsonl").open(encoding="utf-8") as handle:
        queries = {str(row["_id"]): row["text"] for row in map(json.loads, handle)}
    relevant: dict[str, dict[str, int]] = {}
    for line in (folder / "qrels" / f"{split}.tsv").read_text(encoding="utf-8").splitlines()[1:]:
        query, doc, score = line.split("\t")
        relevant.setdefault(query, {})[doc] = int(score)
    return corpus, queries, relevant


# ---------------------------------------------------------------------------------------------- the tasks


def local_metadata(name: str, task_type: str, main_score: str, description: str, path: str) -> TaskMetadata:
    return TaskMetadata(
        name=name,
        description=description,
        dataset={"path": f"local://{path}", "revision": "local"},  # never passed to load_dataset: load_data reads files
        type=task_type,
        category="t2t" if task_type not in ("Classification", "Clustering") else "t2c",
        modalities=["text"],
        eval_splits=["test"],
        eval_langs=["eng-Latn"],
        main_score=main_score,
    )


class LocalTask:
    """Mixed in before an mteb task class: `load_data` builds `self.dataset` from files under data_dir."""

    def __init__(self, data_dir: str | Path, limit: int | None = None, distractors_per_query: int = 2, seed: int = 42):
        super().__init__(seed=seed)  # mteb seeds its own experiments (classifiers, clustering) with it
        self.data_dir = Path(data_dir)
        self.limit = limit
        self.distractors_per_query = distractors_per_query
        self.sample_seed = seed

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if not self.data_loaded:
            self.dataset = self.read()
            self.data_loaded = True

    def read(self) -> Any:
        raise NotImplementedError

    def sample(self, rows: list[dict[str, Any]], limit: int | None = None) -> list[dict[str, Any]]:
        return [rows[i] for i in sample_rows(len(rows), limit or self.limit, self.sample_seed)]


class LocalSTSBenchmark(LocalTask, AbsTaskSTS):
    min_score, max_score = 0, 5
    metadata = local_metadata("LocalSTSBenchmark", "STS", "cosine_spearman", "STS-B test pairs, scores 0-5.", "stsbenchmark/sts-test.csv")

    def read(self) -> DatasetDict:
        return DatasetDict({"test": Dataset.from_list(self.sample(read_sts_benchmark(self.data_dir / "stsbenchmark" / "sts-test.csv")))})


class LocalSICKR(LocalTask, AbsTaskSTS):
    min_score, max_score = 1, 5
    metadata = local_metadata("LocalSICK-R", "STS", "cosine_spearman", "SICK test pairs, relatedness 1-5.", "sick/SICK_test_annotated.txt")

    def read(self) -> DatasetDict:
        return DatasetDict({"test": Dataset.from_list(self.sample(read_sick(self.data_dir / "sick" / "SICK_test_annotated.txt")))})


class LocalBanking77(LocalTask, AbsTaskClassification):
    metadata = local_metadata("LocalBanking77", "Classification", "accuracy", "Banking77: 77 intents of banking queries.", "banking77")

    def read(self) -> DatasetDict:
        folder = self.data_dir / "banking77"
        return DatasetDict({split: Dataset.from_list(self.sample(read_banking77(folder / f"{split}.csv"))) for split in ("train", "test")})


class LocalEmotion(LocalTask, AbsTaskClassification):
    metadata = local_metadata("LocalEmotion", "Classification", "accuracy", "Emotion (CARER): tweets, 6 emotions.", "emotion")

    def read(self) -> DatasetDict:
        folder = self.data_dir / "emotion"
        return DatasetDict({split: Dataset.from_list(self.sample(read_emotion(folder / f"{split}.txt"))) for split in ("train", "test")})


class LocalStackOverflowClustering(LocalTask, AbsTaskClustering):
    metadata = local_metadata(
        "LocalStackOverflowClustering", "Clustering", "v_measure", "STC2 StackOverflow titles, 20 topics.", "stc2_clustering"
    )
    full_size = 2048  # without a limit: the size MTEB's fast clustering tasks subsample to
    max_fraction_of_documents_to_embed = None  # the sample is drawn here, with the suite's seed

    def read(self) -> DatasetDict:
        folder = self.data_dir / "stc2_clustering"
        rows = self.sample(read_stc2(folder / "StackOverflow.txt", folder / "StackOverflow_gnd.txt"), self.limit or self.full_size)
        # mteb's bootstrap draws this many texts (with replacement) per clustering experiment.
        self.max_documents_per_cluster = len(rows)
        return DatasetDict({"test": Dataset.from_list(rows)})


class LocalMRPC(LocalTask, AbsTaskPairClassification):
    metadata = local_metadata("LocalMRPC", "PairClassification", "max_ap", "MRPC test pairs: paraphrase or not.", "mrpc/msr-para-test.tsv")

    def read(self) -> DatasetDict:
        return DatasetDict({"test": Dataset.from_list(self.sample(read_mrpc(self.data_dir / "mrpc" / "msr-para-test.tsv")))})


def retrieval_split(
    corpus: dict[str, dict[str, str]],
    queries: dict[str, str],
    relevant: dict[str, dict[str, int]],
    top_ranked: dict[str, list[str]] | None = None,
) -> dict[str, Any]:
    """mteb's in-memory retrieval split: corpus and queries as Datasets, qrels (and candidates) as dicts."""
    return {
        "corpus": Dataset.from_list([{"id": doc, "title": row["title"], "text": row["text"]} for doc, row in corpus.items()]),
        "queries": Dataset.from_list([{"id": query, "text": text} for query, text in queries.items()]),
        "relevant_docs": relevant,
        "top_ranked": top_ranked,
    }


class LocalTrecQA(LocalTask, AbsTaskRetrieval):
    """Answer selection as mteb reranking: each question ranks only its own candidate sentences."""

    metadata = local_metadata(
        "LocalTrecQA", "Reranking", "map_at_1000", "TREC-QA (Wang 2007) test: rank candidate answer sentences.", "trecqa_wang/test.csv"
    )

    def read(self) -> dict[str, Any]:
        rows = read_trecqa(self.data_dir / "trecqa_wang" / "test.csv")
        by_question: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_question.setdefault(row["question"], []).append(row)
        questions = list(by_question)
        kept = [questions[i] for i in whole_groups_up_to([len(by_question[q]) for q in questions], self.limit, self.sample_seed)]
        corpus, queries, relevant, candidates = {}, {}, {}, {}
        for number, question in enumerate(kept):
            query = f"q{number}"
            queries[query] = question
            candidates[query] = []
            for index, row in enumerate(by_question[question]):
                doc = f"{query}-a{index}"  # per question: the same sentence may be a candidate of several
                corpus[doc] = {"title": "", "text": row["answer"]}
                candidates[query].append(doc)
                if row["label"]:
                    relevant.setdefault(query, {})[doc] = 1
        return {"default": {"test": retrieval_split(corpus, queries, relevant, candidates)}}


class LocalSciFact(LocalTask, AbsTaskRetrieval):
    metadata = local_metadata(
        "LocalSciFact", "Retrieval", "ndcg_at_10", "SciFact (BEIR layout): retrieve abstracts supporting a claim.", "scifact"
    )

    def read(self) -> dict[str, Any]:
        corpus, queries, relevant = read_beir(self.data_dir / "scifact", "test")
        query_ids = [query for query in queries if query in relevant]
        kept_queries, kept_docs = subsample_retrieval(
            query_ids, relevant, list(corpus), self.limit, self.distractors_per_query, self.sample_seed
        )
        return {
            "default": {
                "test": retrieval_split(
                    {doc: corpus[doc] for doc in kept_docs},
                    {query: queries[query] for query in kept_queries},
                    {query: relevant[query] for query in kept_queries},
                )
            }
        }
