"""Local mteb tasks: MTEB-style datasets read from files under evaluation.data_dir, never from the hub.

Each task is an mteb task class (AbsTaskSTS, AbsTaskClassification, ...) whose `load_data` reads local files, so
mteb's own evaluators compute every score, with MTEB's protocol for each task:

    full size (no limit)       what MTEB's task of the same data evaluates: STS-B test (1,379 pairs); SICK-R all
                               9,927 pairs (MTEB's SICK-R "test" split is the whole of SICK); Banking77 and Emotion
                               test splits, classifiers trained by mteb (10 experiments of `samples_per_label` rows
                               per label drawn from the train split: 8, and 16 for Emotion, as MTEB's tasks set);
                               SciFact over its whole corpus; MRPC and TREC-QA test splits; StackOverflow: 2,048 of
                               its 20,000 titles (no MTEB task has this data)

`limit` N is the quick mode. It caps cost without changing what the score measures, by sampling (deterministically,
with `seed`) so that the sample keeps the full task's distribution:

    STS                        N pairs, one from each of N strata of the gold score (so the score range is kept)
    pair classification        N pairs, labels in their full-size proportions
    classification             N test rows, labels in their full-size proportions; the classifiers are the first
                               of mteb's 10 experiments, trained on exactly the rows the full-size run trains them on
                               (as many experiments as keep the training texts under QUICK_TRAIN_TEXTS)
    clustering                 N texts, labels in their full-size proportions
    retrieval                  N queries; the corpus keeps their relevant documents, the hard_negatives_per_query
                               documents closest to each kept query by TF-IDF (lexical, the same for every model: the
                               documents that compete for the top ranks at full size) and distractors_per_query * N
                               random others; the corpus size is in the report (task scores `corpus_size`)
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


def stratified_rows(labels: Sequence[Any], limit: int | None, seed: int) -> list[int]:
    """Indices of about `limit` rows with every label in its share of the whole (largest remainders, at least one
    row of each label while the limit allows), in their original order; all rows without a limit."""
    if limit is None or limit >= len(labels):
        return list(range(len(labels)))
    groups: dict[Any, list[int]] = {}
    for index, label in enumerate(labels):
        groups.setdefault(label, []).append(index)
    exact = {label: limit * len(rows) / len(labels) for label, rows in groups.items()}
    quota = {label: int(share) for label, share in exact.items()}
    if limit >= len(groups):
        quota = {label: max(1, count) for label, count in quota.items()}
    by_remainder = sorted(groups, key=lambda label: (quota[label] - exact[label], str(label)))
    for label in by_remainder[: max(0, limit - sum(quota.values()))]:
        quota[label] += 1
    rng = np.random.default_rng(seed)
    kept = []
    for label, rows in groups.items():
        kept += rng.choice(rows, size=min(len(rows), quota[label]), replace=False).tolist()
    return sorted(kept)


def score_strata_rows(scores: Sequence[float], limit: int | None, seed: int) -> list[int]:
    """Indices of `limit` rows: the rows sorted by score cut into `limit` equal strata, one random row from each
    (so a sample of an STS set keeps its spread of gold scores), in their original order."""
    if limit is None or limit >= len(scores):
        return list(range(len(scores)))
    order = np.argsort(np.asarray(scores, dtype=float), kind="stable")
    bounds = np.linspace(0, len(scores), limit + 1).astype(int)
    rng = np.random.default_rng(seed)
    return sorted(int(order[rng.integers(low, high)]) for low, high in zip(bounds[:-1], bounds[1:], strict=True))


def lexical_neighbours(queries: Sequence[str], documents: Sequence[str], k: int) -> list[list[int]]:
    """For each query, the indices of the k documents most similar to it by TF-IDF cosine (words, sublinear tf,
    English stop words dropped): a model-independent stand-in for the documents that compete for its top ranks."""
    if k <= 0 or not documents:
        return [[] for _ in queries]
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(sublinear_tf=True, stop_words="english")
    doc_matrix = vectorizer.fit_transform(documents)
    similarity = (vectorizer.transform(queries) @ doc_matrix.T).toarray()  # (Q, D), rows L2-normalised: cosine
    k = min(k, len(documents))
    top = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
    return [sorted(row.tolist(), key=lambda doc, q=q: (-similarity[q, doc], doc)) for q, row in enumerate(top)]


def subsample_retrieval_hard(
    query_ids: Sequence[str],
    query_texts: Sequence[str],
    relevant: dict[str, dict[str, int]],
    corpus_ids: Sequence[str],
    corpus_texts: Sequence[str],
    limit: int | None,
    hard_negatives_per_query: int,
    distractors_per_query: int,
    seed: int,
) -> tuple[list[str], list[str]]:
    """(kept query ids, kept corpus ids) of the quick mode: `limit` queries, their relevant documents, each kept
    query's hard_negatives_per_query lexical neighbours that are not relevant to it, and
    distractors_per_query * len(kept queries) random other documents. Everything without a limit."""
    if limit is None:
        return list(query_ids), list(corpus_ids)
    kept = sample_rows(len(query_ids), limit, seed)
    queries = [query_ids[i] for i in kept]
    needed = {doc for query in queries for doc in relevant.get(query, {})}
    neighbours = lexical_neighbours([query_texts[i] for i in kept], corpus_texts,
                                    hard_negatives_per_query + max((len(relevant.get(q, {})) for q in queries), default=0))
    for query, row in zip(queries, neighbours, strict=True):
        negatives = [corpus_ids[doc] for doc in row if corpus_ids[doc] not in relevant.get(query, {})]
        needed |= set(negatives[:hard_negatives_per_query])
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

    def __init__(self, data_dir: str | Path, limit: int | None = None, distractors_per_query: int = 2, seed: int = 42,
                 hard_negatives_per_query: int = 10):
        super().__init__(seed=seed)  # mteb seeds its own experiments (classifiers, clustering) with it
        self.data_dir = Path(data_dir)
        self.limit = limit
        self.distractors_per_query = distractors_per_query
        self.hard_negatives_per_query = hard_negatives_per_query
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
        rows = read_sts_benchmark(self.data_dir / "stsbenchmark" / "sts-test.csv")
        kept = score_strata_rows([row["score"] for row in rows], self.limit, self.sample_seed)
        return DatasetDict({"test": Dataset.from_list([rows[i] for i in kept])})


SICK_FILES = ("SICK_train.txt", "SICK_trial.txt", "SICK_test_annotated.txt")


class LocalSICKR(LocalTask, AbsTaskSTS):
    """MTEB's SICK-R evaluates all of SICK (train + trial + test, 9,927 pairs) as its test split; so does this task."""

    min_score, max_score = 1, 5
    metadata = local_metadata("LocalSICK-R", "STS", "cosine_spearman", "SICK, all 9,927 pairs, relatedness 1-5.", "sick")

    def read(self) -> DatasetDict:
        rows = [row for name in SICK_FILES for row in read_sick(self.data_dir / "sick" / name)]
        kept = score_strata_rows([row["score"] for row in rows], self.limit, self.sample_seed)
        return DatasetDict({"test": Dataset.from_list([rows[i] for i in kept])})


# Under a limit, mteb runs only as many of its classifier experiments as keep the training texts it encodes under
# this many: each experiment draws samples_per_label rows per label from the WHOLE train split, so the experiments
# that run are exactly the first ones of the full-size run (the same rows, the same classifiers); only the test split
# is sampled. Banking77 (77 labels x 8) runs 2 of its 10 experiments, Emotion (6 x 16) all 10.
QUICK_TRAIN_TEXTS = 1500


def quick_experiments(samples_per_label: int, num_labels: int, n_experiments: int) -> int:
    """How many of mteb's classifier experiments the quick mode runs (at least one)."""
    return max(1, min(n_experiments, QUICK_TRAIN_TEXTS // max(1, samples_per_label * num_labels)))


class LocalClassification(LocalTask, AbsTaskClassification):
    """A train and a test split read by `rows(split)`; under a limit, label-stratified test rows and the first
    quick_experiments(...) of mteb's experiments."""

    def rows(self, split: str) -> list[dict[str, str]]:
        raise NotImplementedError

    def read(self) -> DatasetDict:
        train, test = self.rows("train"), self.rows("test")
        if self.limit is not None:
            self.n_experiments = quick_experiments(self.samples_per_label, len({r["label"] for r in train}), self.n_experiments)
            test = [test[i] for i in stratified_rows([r["label"] for r in test], self.limit, self.sample_seed)]
        return DatasetDict({"train": Dataset.from_list(train), "test": Dataset.from_list(test)})


class LocalBanking77(LocalClassification):
    metadata = local_metadata("LocalBanking77", "Classification", "accuracy", "Banking77: 77 intents of banking queries.", "banking77")

    def rows(self, split: str) -> list[dict[str, str]]:
        return read_banking77(self.data_dir / "banking77" / f"{split}.csv")


class LocalEmotion(LocalClassification):
    metadata = local_metadata("LocalEmotion", "Classification", "accuracy", "Emotion (CARER): tweets, 6 emotions.", "emotion")
    samples_per_label = 16  # as MTEB's EmotionClassification

    def rows(self, split: str) -> list[dict[str, str]]:
        return read_emotion(self.data_dir / "emotion" / f"{split}.txt")


class LocalStackOverflowClustering(LocalTask, AbsTaskClustering):
    metadata = local_metadata(
        "LocalStackOverflowClustering", "Clustering", "v_measure", "STC2 StackOverflow titles, 20 topics.", "stc2_clustering"
    )
    full_size = 2048  # without a limit: the size MTEB's fast clustering tasks subsample to
    max_fraction_of_documents_to_embed = None  # the sample is drawn here, with the suite's seed

    def read(self) -> DatasetDict:
        folder = self.data_dir / "stc2_clustering"
        rows = read_stc2(folder / "StackOverflow.txt", folder / "StackOverflow_gnd.txt")
        rows = [rows[i] for i in stratified_rows([row["labels"] for row in rows], self.limit or self.full_size, self.sample_seed)]
        # mteb's bootstrap draws this many texts (with replacement) per clustering experiment.
        self.max_documents_per_cluster = len(rows)
        return DatasetDict({"test": Dataset.from_list(rows)})


class LocalMRPC(LocalTask, AbsTaskPairClassification):
    metadata = local_metadata("LocalMRPC", "PairClassification", "max_ap", "MRPC test pairs: paraphrase or not.", "mrpc/msr-para-test.tsv")

    def read(self) -> DatasetDict:
        rows = read_mrpc(self.data_dir / "mrpc" / "msr-para-test.tsv")
        kept = stratified_rows([row["labels"] for row in rows], self.limit, self.sample_seed)
        return DatasetDict({"test": Dataset.from_list([rows[i] for i in kept])})


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
        corpus_ids = list(corpus)
        kept_queries, kept_docs = subsample_retrieval_hard(
            query_ids, [queries[query] for query in query_ids], relevant, corpus_ids,
            [f"{corpus[doc]['title']} {corpus[doc]['text']}" for doc in corpus_ids], self.limit,
            self.hard_negatives_per_query, self.distractors_per_query, self.sample_seed,
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

    def task_specific_scores(
        self,
        scores: dict[str, dict[str, float]],
        qrels: dict[str, dict[str, int]],
        results: dict[str, dict[str, float]],
        hf_split: str,
        hf_subset: str,
    ) -> dict[str, float]:
        # A retrieval score depends on how many documents compete: the report says what was searched.
        split = self.dataset[hf_subset][hf_split]
        return {"corpus_size": float(len(split["corpus"])), "queries": float(len(split["queries"]))}
