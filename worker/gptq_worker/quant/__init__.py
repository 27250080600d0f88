"""The GPTQ algorithm as pure functions on tensors: Hessians, the blocked solve, rounding.

No I/O, no model knowledge: ``hessian.py`` accumulates ``H`` (and GPTAQ's cross term),
``gptq.py`` is the solve (arXiv:2210.17323, section 4; GPTAQ, arXiv:2504.02692), and
``solve_triton.py`` the same block solve as one Triton kernel for GPUs.
"""
