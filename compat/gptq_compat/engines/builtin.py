"""The built-in runtime (``gptq-worker serve``): every checkpoint this engine writes."""

from __future__ import annotations

from gptq_compat import __version__
from gptq_compat.rules import Engine, Kernel

BUILTIN_KERNEL = Kernel("builtin/torch", None)

BUILTIN = Engine(
    backend="builtin",
    version=__version__,
    label=f"built-in runtime {__version__}",
    rules=(),
    kernels=(BUILTIN_KERNEL,),
    how_checked="tests/worker/test_serve.py and test_server_http.py",
)
