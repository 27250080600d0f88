"""How far Hessians from the tensor cores and from fp32 products are from an fp64 reference.

Layer inputs are fp16 or bf16, so their products are exact in fp32; the paths differ only
in how the sums are ordered and rounded. Prints the relative Frobenius error of each path
against fp64, for activation-like inputs (a few large outlier channels). Run on a GPU.
"""

from __future__ import annotations

import json

import torch

from gptq_worker.quant.hessian import Hessian


def main() -> None:
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16):
        for features in (4096, 14336):
            scale = torch.ones(features, device=dev)
            scale[:16] = 30.0  # outlier channels, as LLM activations have
            batches = [
                (torch.randn(8, 2048, features, device=dev, generator=g) * scale).to(dtype)
                for _ in range(4)
            ]
            ref = torch.zeros(features, features, dtype=torch.float64, device=dev)
            for b in batches:
                x = b.reshape(-1, features).double()
                ref += x.t() @ x
            ref *= 2 / (8 * len(batches))
            row = {"dtype": str(dtype).removeprefix("torch."), "features": features}
            for precision in ("tensor-core", "fp32"):
                acc = Hessian(features, dev, precision)
                for b in batches:
                    acc.add(b)
                H = acc.result().double()
                row[precision] = float(torch.linalg.norm(H - ref) / torch.linalg.norm(ref))
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
