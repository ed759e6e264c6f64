"""GMAC/s of the compiled matrix products (kernels/linear.cpp) on the default model's shapes, per number
of rows of x: the integer path against the fp32 panels for a Q4_1 weight, the panels against
`F.linear` (MKL) for an fp32 weight. What layers.INT_KERNEL_MAX_ROWS and F32_KERNEL_MAX_ROWS rest on.

    python benchmarks/linear_kernels.py [--rows 1 4 8 16 32 64 512] [--seconds 0.3] [--isa avx2]

Random codes and scales of a real weight's size; each figure is the best of a timed loop's mean, so
run it on a quiet machine and compare figures from one run.
"""

from __future__ import annotations

import argparse
import time

import torch

from kvserve.kernels import compute_ops

SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576), (576, 49152)]  # (K, N): QKV, O, gate/up, down, LM head


def timed(seconds: float, fn, *args) -> float:
    for _ in range(3):
        fn(*args)
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        fn(*args)
        n += 1
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64, 512])
    parser.add_argument("--seconds", type=float, default=0.3)
    parser.add_argument("--isa", choices=["avx2", "avx512"], default=None, help="the build to time (default: the best)")
    args = parser.parse_args()
    ops = compute_ops(args.isa)
    if ops is None:
        raise SystemExit("the compute kernels are not available here")
    empty = torch.empty(0)
    for k, n in SHAPES:
        codes = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
        scales = (torch.rand(n, k // 32) * 0.01).half()
        mins = (-torch.rand(n, k // 32) * 0.08).half()
        dense = torch.randn(n, k)
        print(f"K={k} N={n}  (GMAC/s: Q4_1 integer / Q4_1 panels | fp32 panels / F.linear)")
        for m in args.rows:
            x = torch.randn(m, k)
            macs = m * k * n / 1e9
            seconds = args.seconds
            integer = macs / timed(seconds, ops.q_linear, x, codes, scales, mins, empty, 4, 10**9)
            panels = macs / timed(seconds, ops.q_linear, x, codes, scales, mins, empty, 4, 0)
            f32 = macs / timed(seconds, ops.f32_linear, x, dense, empty, 0)
            blas = macs / timed(seconds, torch.nn.functional.linear, x, dense)
            print(f"  M={m:4d}: {integer:5.1f} / {panels:5.1f} | {f32:5.1f} / {blas:5.1f}", flush=True)


if __name__ == "__main__":
    main()
