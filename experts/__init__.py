"""Expert LMs: the shared tokenizer, the seed model and per-cluster training."""
