"""bench/quality.py with the new paths forced onto a small model's widths (argv[1]: forced|default).

Both reuse a model already trained in --workdir (the same model for both)."""

import runpy
import sys
from pathlib import Path

import gptq_worker.demo.models as demo

mode = sys.argv.pop(1)
if mode == "forced":
    import gptq_worker.quant.gptq as g
    import gptq_worker.quant.hessian as h

    h.Hessian.SYMMETRIC_FROM = 256  # lower-triangle blocks from width 256 (engine: 8192)
    g.lower_inverse.__defaults__ = (32,)  # halves down to 32 wide (engine: 2048)
if True:
    built = demo.build_demo_model

    def reuse(directory, *args, **kwargs):
        d = Path(directory)
        if (d / "model" / "config.json").exists() and (d / "eval.txt").exists():
            return {
                "model": d / "model",
                "calibration": d / "calibration.txt",
                "eval": d / "eval.txt",
            }
        return built(directory, *args, **kwargs)

    demo.build_demo_model = reuse
sys.argv[0] = "bench/quality.py"
runpy.run_path("bench/quality.py", run_name="__main__")
