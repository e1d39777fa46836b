"""Evaluation of LLM2Vec-Gen models with mteb: local tasks, public MTEB tasks, baselines, safety retrieval, reports.

    suites.py    which tasks "local" and "mteb-lite" stand for (no mteb import: offline mode is decided first)
    tasks.py     mteb tasks whose data are read from local files (STS-B, SICK-R, Banking77, Emotion, StackOverflow,
                 MRPC, TREC-QA, SciFact), with a deterministic --limit
    safety.py    AdvBench-IR-style safety retrieval and its harmful@k metric
    encoders.py  LLM2Vec-Gen, its teacher and the backbone's training-free baselines (mean pooling, last token,
                 PromptEOL plain and in the chat template, Echo) as one mteb encoder class
    oracle.py    the response oracle (the teacher on the backbone's answers) and the check stage's pre-flight verdict
    progress.py  progress lines (items done, rate, time left) of long encodes and generations
    runner.py    mteb.evaluate over models x tasks -> main scores
    report.py    JSON, markdown table, bar chart and MLflow metrics
    lens.py      what an embedding decodes to, and the logit lens on the compression tokens
"""
