"""The GPTQ algorithm as pure functions on tensors: Hessians, the blocked solve, rounding.

No I/O, no model knowledge: ``gptq.py`` is the maths (arXiv:2210.17323, section 4), and
``solve_triton.py`` the same block solve as one Triton kernel for GPUs.
"""
