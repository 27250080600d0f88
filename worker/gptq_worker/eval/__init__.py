"""Perplexity of a model or GPTQ checkpoint on held-out text (``gptq-worker eval``)."""
