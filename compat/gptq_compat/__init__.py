"""gptq_compat: what a quantization run and a GPTQ checkpoint are, and who can serve them.

Torch-free, so the operator (and its slim image) imports it: the settings models
(``config``) that the CLI, config files and the CRDs share, and the serving rules
(``rules``, with one rule set per engine version in ``engines``) that decide which engine,
kernel and GPU can load a checkpoint.
"""

__version__ = "0.1.0"
