"""gptq_compat: what a quantization run and a GPTQ checkpoint are, and who can serve them.

Torch-free, so the operator (and its slim image) imports it: the settings models
(``config``) that the CLI, config files and the CRDs share, and the serving rules
(``kernels``) that decide which engine and GPU can load a checkpoint.
"""
