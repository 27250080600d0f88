"""gptq_worker: the GPTQ engine of gptq-operator (library and ``gptq-worker`` CLI).

Import name ``gptq_worker`` (folder ``worker/``); the operator lives in ``gptq_operator``
(folder ``operator/``) because a package named ``operator`` would shadow the standard library.
"""

__version__ = "0.1.0"
