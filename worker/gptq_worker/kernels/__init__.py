"""Compute kernels of the built-in serving runtime (fused GPTQ dequantize-and-multiply)."""
