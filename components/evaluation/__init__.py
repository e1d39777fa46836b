"""Evaluation of LLM2Vec-Gen models with mteb: local tasks, public MTEB tasks, baselines, safety retrieval, reports.

    suites.py    which tasks "local" and "mteb-lite" stand for (no mteb import: offline mode is decided first)
    tasks.py     mteb tasks whose data are read from local files (STS-B, SICK-R, Banking77, Emotion, StackOverflow,
                 MRPC, TREC-QA, SciFact), with a deterministic --limit
    safety.py    AdvBench-IR-style safety retrieval and its harmful@k metric
    encoders.py  LLM2Vec-Gen, its teacher and the backbone's mean/last-token readouts as one mteb encoder class
    runner.py    mteb.evaluate over models x tasks -> main scores
    report.py    JSON, markdown table, bar chart and MLflow metrics
    lens.py      what an embedding decodes to, and the logit lens on the compression tokens
"""
