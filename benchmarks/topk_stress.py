"""Exactness of the Triton top-k on a GPU at the targets shape, many inputs, default and tuned schedules.

    python benchmarks/topk_stress.py

4096 x 32768 rows, k from the V3.2 spec: 6 seeds (plain randn, causal windows on odd seeds, heavily
tied values on every third), 3 calls each; every 7th row is checked against the exact top-k
contract (dsagen.verify.assert_topk). A race or a wrong fallback shows up as a Mismatch.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dsagen  # noqa: E402
from dsagen.verify import assert_topk  # noqa: E402


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("error: this check needs a CUDA GPU")
    spec = dsagen.load_spec(Path(__file__).resolve().parents[1] / "specs" / "deepseek_v32.toml")
    k, S, N = spec.topk.k, 4096, 32768
    for name, use_db in (("default", False), ("tuned", True)):
        kernels = dsagen.build(spec, use_db=use_db)
        print(name, kernels.explain(S, N)["topk"]["schedule"], flush=True)
        for seed in range(6):
            g = torch.Generator(device="cuda").manual_seed(seed)
            x = torch.randn(S, N, device="cuda", generator=g)
            if seed % 3 == 2:
                x = (x * 4).round() / 4  # heavy ties
            ks = torch.zeros(S, dtype=torch.int32, device="cuda")
            ke = torch.full((S,), N, dtype=torch.int32, device="cuda")
            if seed % 2:
                ke = torch.arange(N - S + 1, N + 1, dtype=torch.int32, device="cuda")
            out = torch.full((S, k), -7, dtype=torch.int32, device="cuda")
            rows = torch.arange(0, S, 7, device="cuda")
            for _ in range(3):
                got = kernels.topk(x, ks, ke, out=out)
                torch.cuda.synchronize()
                assert_topk(got[rows].cpu(), x[rows].cpu(), ks[rows].cpu(), ke[rows].cpu(), k)
            print(name, "seed", seed, "ok", flush=True)


if __name__ == "__main__":
    main()
