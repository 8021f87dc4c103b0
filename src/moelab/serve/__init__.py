"""`moelab serve`: an OpenAI-compatible HTTP server with continuous batching (Yu et al. 2022, Orca).

    scheduler     Engine: one thread, decode steps over a running batch that requests join and leave (no HTTP)
    batch_cache   the batch's left-padded KV cache: join a prefilled row, keep the unfinished rows
    protocol      the OpenAI request bodies checked field by field; response and stream-chunk objects
    app           the FastAPI app: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics
    metrics       Prometheus text: requests, tokens, latency histograms, experts touched vs uniform routing
    server        load a checkpoint as `moelab generate` does, build the engine and app, run uvicorn

FastAPI and uvicorn are the optional extra `moelab[serve]`; the engine needs neither.
"""
