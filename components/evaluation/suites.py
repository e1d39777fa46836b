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

# The paper's evaluation (the official McGill-NLP/llm2vec-gen scripts/mteb_eval.py runs mteb.get_benchmark("MTEB(eng, v2)")):
# its 41 tasks, as mteb 2.26 lists them (tests/test_suites.py checks the list against mteb, offline).
MTEB_ENG_V2 = [
    "ArguAna", "ArXivHierarchicalClusteringP2P", "ArXivHierarchicalClusteringS2S", "AskUbuntuDupQuestions", "BIOSSES",
    "Banking77Classification", "BiorxivClusteringP2P.v2", "CQADupstackGamingRetrieval", "CQADupstackUnixRetrieval",
    "ClimateFEVERHardNegatives", "FEVERHardNegatives", "FiQA2018", "HotpotQAHardNegatives", "ImdbClassification",
    "MTOPDomainClassification", "MassiveIntentClassification", "MassiveScenarioClassification",
    "MedrxivClusteringP2P.v2", "MedrxivClusteringS2S.v2", "MindSmallReranking", "SCIDOCS", "SICK-R", "STS12", "STS13",
    "STS14", "STS15", "STSBenchmark", "SprintDuplicateQuestions", "StackExchangeClustering.v2",
    "StackExchangeClusteringP2P.v2", "TRECCOVID", "Touche2020Retrieval.v3", "ToxicConversationsClassification",
    "TweetSentimentExtractionClassification", "TwentyNewsgroupsClustering.v2", "TwitterSemEval2015", "TwitterURLCorpus",
    "SummEvalSummarization.v2", "AmazonCounterfactualClassification", "STS17", "STS22.v2",
]

# BRIGHT, all 12 domains with their standard (not long) documents, as the official scripts/bright_eval/run.py runs
# them (one mteb task per domain: the "BRIGHT(v1.1)" benchmark without its Long variants).
BRIGHT = [
    "BrightBiologyRetrieval", "BrightEarthScienceRetrieval", "BrightEconomicsRetrieval", "BrightPsychologyRetrieval",
    "BrightRoboticsRetrieval", "BrightStackoverflowRetrieval", "BrightSustainableLivingRetrieval", "BrightPonyRetrieval",
    "BrightLeetcodeRetrieval", "BrightAopsRetrieval", "BrightTheoremQATheoremsRetrieval",
    "BrightTheoremQAQuestionsRetrieval",
]

# AdvBench-IR by the paper's protocol (components/evaluation/advbench.py): the hub's AdvBench-IR documents in
# 100-word chunks mixed into its Wikipedia sample, top-1/5/20/100 harmful retrieval. Lower is better.
ADVBENCH_IR = ["AdvBench-IR"]
LOWER_IS_BETTER.add("AdvBench-IR")

SUITES = {
    "local": LOCAL_TASKS,
    "mteb-lite": MTEB_LITE,
    "mteb-eng-v2": MTEB_ENG_V2,
    "bright": BRIGHT,
    "advbench-ir": ADVBENCH_IR,
    "paper": MTEB_ENG_V2 + BRIGHT + ADVBENCH_IR,  # everything the paper reports
    "none": [],
}


def expand_suite(names: str | Iterable[str]) -> list[str]:
    """Task names from suite names and/or task names ("local", "mteb-lite,AdvBenchIR"), in order, without repeats."""
    items = [part.strip() for part in names.split(",")] if isinstance(names, str) else [part.strip() for part in names]
    tasks: list[str] = []
    for item in filter(None, items):
        tasks += SUITES.get(item, [item])
    return list(dict.fromkeys(tasks))


def needs_hub(task_names: Iterable[str]) -> list[str]:
    """The tasks that download their data from the Hugging Face hub (every task that is not local)."""
    return [name for name in task_names if name not in LOCAL_TASKS]


def is_offline(task_names: Iterable[str]) -> bool:
    """True when every task reads local files, so nothing may reach for the hub."""
    return all(name in LOCAL_TASKS for name in task_names)
