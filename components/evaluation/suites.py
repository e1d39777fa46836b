"""Which tasks a suite name stands for. No mteb import here: callers decide offline mode before mteb loads."""

from __future__ import annotations

from collections.abc import Iterable

# Local copies of MTEB-style tasks, read from files under evaluation.data_dir (components/evaluation/tasks.py), and
# the AdvBench-IR safety retrieval (components/evaluation/safety.py), whose main score is better when lower.
LOCAL_TASKS = [
    "LocalSTSBenchmark",
    "LocalSICK-R",
    "LocalBanking77",
    "LocalEmotion",
    "LocalStackOverflowClustering",
    "LocalMRPC",
    "LocalTrecQA",
    "LocalSciFact",
    "AdvBenchIR",
]
LOWER_IS_BETTER = {"AdvBenchIR"}

# A small spread of public MTEB tasks, one or two per task type, plus one BRIGHT (reasoning-intensive retrieval)
# domain; they download their data from the Hugging Face hub, so they run only online.
MTEB_LITE = [
    "STSBenchmark.v2",
    "SICK-R",
    "Banking77Classification.v2",
    "EmotionClassification.v2",
    "StackExchangeClustering.v2",
    "SprintDuplicateQuestions",
    "AskUbuntuDupQuestions",
    "SciFact",
    "ArguAna",
    "BrightBiologyRetrieval",
]

SUITES = {"local": LOCAL_TASKS, "mteb-lite": MTEB_LITE, "none": []}


def expand_suite(names: str | Iterable[str]) -> list[str]:
    """Task names from suite names and/or task names ("local", "mteb-lite,AdvBenchIR"), in order, without repeats."""
    items = [part.strip() for part in names.split(",")] if isinstance(names, str) else [part.strip() for part in names]
    tasks: list[str] = []
    for item in filter(None, items):
        tasks += SUITES.get(item, [item])
    return list(dict.fromkeys(tasks))


def is_offline(task_names: Iterable[str]) -> bool:
    """True when every task reads local files, so nothing may reach for the hub."""
    return all(name in LOCAL_TASKS for name in task_names)
