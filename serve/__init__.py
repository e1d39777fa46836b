"""Ray Serve application for a trained LLM2Vec-Gen model (POST /v1/embeddings, POST /v1/decode).

    app.py       the deployment, build_app (import path of serve/config.yaml), dynamic batching
    api.py       the FastAPI routes, error handlers, API key and payload guard, request metrics
    engine.py    the model side without Ray: limits, tokenising, token-budget passes, decoding
    protocol.py  OpenAI-shaped requests, responses and errors
    metrics.py   Prometheus metrics of a replica
    run.py       python -m serve.run MODEL: serve locally on 127.0.0.1
"""
