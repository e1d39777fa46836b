"""Ray Serve application for a trained LLM2Vec-Gen model (POST /v1/embeddings, POST /v1/decode)."""
