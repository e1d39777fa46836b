"""Named prompt sets: the instructions prefixed to a text before it is embedded (`model.prompts: <name>`).

    bare         nothing: texts are embedded as they are (what our CPU models are trained on)
    generative   the official LLM2Vec-Gen evaluation protocol (McGill-NLP/llm2vec-gen, V2, 2026-04-02): on the query
                 side an instruction asking the LLM for the answer a task needs (generative.json: one per MTEB(eng, v2)
                 task, the paper's Table 7; BRIGHT per domain, Table 8), on the document side
                 "Summarize the following passage: " before every passage (scripts/mteb_eval.py, bright_eval/retrievers.py)

A set is a plain mapping in mteb's prompt keys, resolved most specific first: "<task name>-<query|document>",
"<task name>", "<task type>-<query|document>", "<task type>", "<query|document>" (components/evaluation/encoders.py).
So it is stored as it is in a model folder (`llm2vec_gen.json`: prompts) and travels with the model: every named
task has "<task>" (its instruction: the query side, and both sides of a symmetric task) and "<task>-document" (the
passage prefix, read only where mteb embeds documents); task types carry the defaults for tasks not named.

The official code joins `instruction.strip() + " " + text.strip()`; here a prompt is prefixed as it is, so every
instruction ends with that one space.
"""

from __future__ import annotations

from collections.abc import Mapping

PASSAGE_PREFIX = "Summarize the following passage: "

# generative.json of McGill-NLP/llm2vec-gen, verbatim (one trailing space added): the query-side instruction of each
# MTEB(eng, v2) task, plus AdvBench-IR and the Instruction-retrieval tasks.
OFFICIAL_BY_TASK: dict[str, str] = {
    "SciFact": "Generate text that supports or refutes this claim. Just output the text, no other text or description:",
    "NFCorpus": "Generate text that best answers this question. Just output the text, no other text or description:",
    "ArguAna": "Generate text that refutes this claim. Just output the text, no other text or description:",
    "Banking77Classification": "Given a online banking query, find the corresponding intents:",
    "EmotionClassification": "Classify the emotion expressed in the given Twitter message into one of the six emotions: "
                             "anger, fear, joy, love, sadness, and surprise:",
    "AmazonCounterfactualClassification": "Classify a given Amazon customer review text as either counterfactual or "
                                          "notcounterfactual:",
    "ImdbClassification": "Classify the sentiment expressed in the given movie review text from the IMDB dataset:",
    "STS12": "Generate text that is semantically similar to this text:",
    "STS13": "Generate text that is semantically similar to this text:",
    "STS14": "Generate text that is semantically similar to this text:",
    "STS15": "Generate text that is semantically similar to this text:",
    "ClimateFEVERHardNegatives": "Generate a Wikipedia-style passage that supports or refutes this climate change claim. "
                                 "Just output the passage text, no other text or description:",
    "HotpotQAHardNegatives": "Generate a Wikipedia-style passage that helps answer this multi-hop question. Just output "
                             "the passage text, no other text or description:",
    "FEVERHardNegatives": "Generate a Wikipedia-style text that supports or refutes this claim. Just output the text, "
                          "no other text or description:",
    "SCIDOCS": "Generate an abstract of a scientific paper in a passage that could be cited by this paper. Just output "
               "the abstract text, no other text or description:",
    "TRECCOVID": "Generate a scientific text that answers this COVID-19 query. Just output the text, no other text or "
                 "description:",
    "Touche2020Retrieval.v3": "Generate a detailed and persuasive argument that answers this question. Just output the "
                              "argument text, no other text or description:",
    "CQADupstackGamingRetrieval": "Generate a detailed question description similar to this gaming question. Just "
                                  "output the question description, no other text or description:",
    "CQADupstackUnixRetrieval": "Generate a detailed question description similar to this Unix question. Just output "
                                "the question description, no other text or description:",
    "FiQA2018": "Generate a detailed reply that answers this financial question. Just output the reply text, no other "
                "text or description:",
    "Robust04InstructionRetrieval": "Generate a relevant document that answers this query:",
    "News21InstructionRetrieval": "Generate a relevant document that answers this query:",
    "Core17InstructionRetrieval": "Generate a relevant document that answers this query:",
    "AdvBench-IR": "Generate a relevant document that answers this query:",
    "ArXivHierarchicalClusteringP2P": "Generate a paper abstract on the same research topic as this arXiv paper:",
    "ArXivHierarchicalClusteringS2S": "Generate a section paragraph that belongs to the same paper/topic as this section:",
    "AskUbuntuDupQuestions": "Generate a duplicate question about the same issue as this Ubuntu question:",
    "BIOSSES": "Generate a biomedical sentence that is semantically similar to this sentence:",
    "BiorxivClusteringP2P.v2": "Generate a biomedical abstract on the same topic as this bioRxiv paper:",
    "MTOPDomainClassification": "Classify the domain of this utterance (e.g., alarms, weather, music, navigation):",
    "MassiveIntentClassification": "Classify the user's intent expressed in this utterance:",
    "MassiveScenarioClassification": "Classify the scenario/domain of this utterance:",
    "MedrxivClusteringP2P.v2": "Generate a clinical abstract on the same topic as this medRxiv paper:",
    "MedrxivClusteringS2S.v2": "Generate a section paragraph from the same clinical study/topic as this section:",
    "MindSmallReranking": "Generate a short news article relevant to this news title:",
    "SICK-R": "Generate a sentence that is semantically similar to this sentence:",
    "STSBenchmark": "Generate text that is semantically similar to this text:",
    "SprintDuplicateQuestions": "Generate a duplicate customer question expressing the same issue:",
    "StackExchangeClustering.v2": "Generate a StackExchange post on the same topic as this one:",
    "StackExchangeClusteringP2P.v2": "Generate a StackExchange post that belongs to the same topic as this post:",
    "ToxicConversationsClassification": "Classify whether the given comment is toxic or non-toxic:",
    "TweetSentimentExtractionClassification": "Classify the sentiment of the given tweet as positive, negative, or neutral:",
    "TwentyNewsgroupsClustering.v2": "Generate a message that belongs to the same newsgroup category as this post:",
    "TwitterSemEval2015": "Generate a tweet that is semantically similar to this tweet:",
    "TwitterURLCorpus": "Generate a tweet that discusses the same linked content/topic as this tweet:",
    "SummEvalSummarization.v2": "Generate a concise and faithful summary of this article:",
    "STS17": "Generate text that is semantically similar to this text:",
    "STS22.v2": "Generate text that is semantically similar to this text:",
}

# BRIGHT, per domain: the paper's Table 8 and scripts/bright_eval/configs/ours/*.json, whose "{task}" the official
# run fills with the domain's name as BRIGHT spells it ("earth_science" -> "earth science" in the table). Table 8
# prints economics as "Given a task post" (the placeholder left unfilled); the domain's name is used here, as for the
# six other StackExchange domains. Keys are mteb's task names.
BRIGHT_BY_TASK: dict[str, str] = {
    "BrightBiologyRetrieval": "Given a biology post, generate relevant passages that help answer the post:",
    "BrightEarthScienceRetrieval": "Given a earth science post, generate relevant passages that help answer the post:",
    "BrightEconomicsRetrieval": "Given a economics post, generate relevant passages that help answer the post:",
    "BrightPsychologyRetrieval": "Given a psychology post, generate relevant passages that help answer the post:",
    "BrightRoboticsRetrieval": "Given a robotics post, generate relevant passages that help answer the post:",
    "BrightStackoverflowRetrieval": "Given a stackoverflow post, generate relevant passages that help answer the post:",
    "BrightSustainableLivingRetrieval": "Given a sustainable living post, generate relevant passages that help answer "
                                        "the post:",
    "BrightPonyRetrieval": "Given a pony question, generate relevant passages that help answer the question:",
    "BrightLeetcodeRetrieval": "Given a coding problem, generate relevant examples that help answer the problem:",
    "BrightAopsRetrieval": "Given a Math problem, generate relevant examples that help answer the problem:",
    "BrightTheoremQATheoremsRetrieval": "Given a Math problem, only find the relevant theorems that help answer the "
                                        "problem, I don't want the answer to the problem:",
    "BrightTheoremQAQuestionsRetrieval": "Given a Math problem, generate relevant examples that help answer the problem:",
}

# Our own tasks and mteb's other versions of official ones: the instruction of the official task holding the same data.
ALIASES: dict[str, str] = {
    "LocalSTSBenchmark": "STSBenchmark",
    "STSBenchmark.v2": "STSBenchmark",  # mteb-lite's version of STS-B
    "LocalSICK-R": "SICK-R",
    "LocalBanking77": "Banking77Classification",
    "Banking77Classification.v2": "Banking77Classification",
    "LocalEmotion": "EmotionClassification",
    "EmotionClassification.v2": "EmotionClassification",
    "LocalSciFact": "SciFact",
    "AdvBenchIR": "AdvBench-IR",  # the local check (components/evaluation/safety.py)
    # STC2 StackOverflow titles: the nearest official clustering task is StackExchange's (same site family, topics).
    "LocalStackOverflowClustering": "StackExchangeClustering.v2",
}

# Defaults for tasks the sets above do not name, by mteb task type. Where the official protocol has one instruction
# for a whole kind of task it is used verbatim (STS; retrieval queries: the Instruction-retrieval and AdvBench-IR one;
# summarization); the others are ours, phrased like the official ones of that type (marked).
GENERATIVE_BY_TYPE: dict[str, str] = {
    "STS": "Generate text that is semantically similar to this text:",
    "PairClassification": "Generate text that is semantically similar to this text:",  # ours: TwitterSemEval2015's, generalised
    "Retrieval": "Generate a relevant document that answers this query:",
    "InstructionRetrieval": "Generate a relevant document that answers this query:",
    "Reranking": "Generate a relevant document that answers this query:",  # ours: the retrieval one
    "Clustering": "Generate a text on the same topic as this one:",  # ours: StackExchangeClustering.v2's, generalised
    "Classification": "Classify the topic or intent of this text:",  # ours: the official ones are per task
    "Summarization": "Generate a concise and faithful summary of this article:",
}


def _spaced(instruction: str) -> str:
    return instruction.strip() + " "


def generative_prompts() -> dict[str, str]:
    """The generative set as mteb prompt keys (see the module docstring)."""
    named = {**OFFICIAL_BY_TASK, **BRIGHT_BY_TASK, **{alias: OFFICIAL_BY_TASK[task] for alias, task in ALIASES.items()}}
    prompts: dict[str, str] = {}
    for task, instruction in named.items():
        prompts[task] = _spaced(instruction)
        prompts[f"{task}-document"] = PASSAGE_PREFIX
    for task_type, instruction in GENERATIVE_BY_TYPE.items():
        prompts[task_type] = _spaced(instruction)
        prompts[f"{task_type}-document"] = PASSAGE_PREFIX
    prompts["query"] = _spaced(GENERATIVE_BY_TYPE["Retrieval"])
    prompts["document"] = PASSAGE_PREFIX
    return prompts


PROMPT_SETS: dict[str, dict[str, str]] = {"bare": {}, "generative": generative_prompts()}


def prompt_set(prompts: str | Mapping[str, str]) -> dict[str, str]:
    """The prompts a model stores: a named set's mapping, or an explicit mapping as it is."""
    if isinstance(prompts, str):
        if prompts not in PROMPT_SETS:
            raise ValueError(f"unknown prompt set {prompts!r}; known: {', '.join(PROMPT_SETS)}")
        return dict(PROMPT_SETS[prompts])
    return dict(prompts)
