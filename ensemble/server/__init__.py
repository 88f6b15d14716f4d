"""`cbtm serve`: the ensemble behind an OpenAI-compatible HTTP API with continuous batching.

`protocol` (request and response shapes, the error format), `scheduler` (one decoding batch that requests
join and leave at every step), `metrics` (Prometheus text) and `app` (the FastAPI routes).
"""
