"""``gptq-worker serve``: the built-in OpenAI-compatible runtime for GPTQ checkpoints.

``model`` (the packed ``QuantLinear`` and checkpoint loading), ``generate`` (the batching
engine), ``protocol`` (request schemas and errors), ``metrics`` and ``app`` (HTTP).
"""
