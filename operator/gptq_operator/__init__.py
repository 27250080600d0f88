"""gptq_operator: the Kubernetes operator of gptq-operator (folder ``operator/``).

Not named ``operator``: that would shadow Python's standard-library module.
"""

__version__ = "0.1.0"
