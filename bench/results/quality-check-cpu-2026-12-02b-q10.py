"""bench/quality.py with this session's solve changes forced onto a small model's widths
(argv[1]: forced|default). 'forced': 32-column blocks in panels of 4 (engine: 128 and 8),
GPTAQ's correction in triangular blocks of 64 columns (engine: from 1024). All modes reuse
one model trained in --workdir."""

import functools
import runpy
import sys
from pathlib import Path

import gptq_worker.demo.models as demo

mode = sys.argv.pop(1)
if mode == "forced":
    import gptq_worker.pipeline.driver as d
    import gptq_worker.quant.gptq as g

    g.BLOCKS_PER_PANEL = 4
    d.gptq_quantize = functools.partial(g.gptq_quantize, block_size=32)
    g.gptaq_correction_rows = functools.partial(g.gptaq_correction_rows, width=64)
built = demo.build_demo_model


def reuse(directory, *args, **kwargs):
    p = Path(directory)
    if (p / "model" / "config.json").exists() and (p / "eval.txt").exists():
        return {"model": p / "model", "calibration": p / "calibration.txt", "eval": p / "eval.txt"}
    return built(directory, *args, **kwargs)


demo.build_demo_model = reuse
sys.argv[0] = "bench/quality.py"
runpy.run_path("bench/quality.py", run_name="__main__")
