"""The GPTQ checkpoint format: bit packing, writing and reading checkpoints, validation.

What is written here is what vLLM, LMDeploy and GPTQModel read (docs/checkpoint-format.md).
"""
