"""A/B of the compute kernels against those of another git revision, in one process, interleaved.

    python benchmarks/kernel_ab.py --base HEAD~1 [--isa avx2] [--rows 16 32 512] [--rounds 7]

On these shared 2-core machines two runs a minute apart differ by 10-30%, so timing the old code in
one run and the new in another says little. Here both builds are loaded side by side (the base
revision's kernels/*.cpp, taken with `git show`, built under another module name) and each
measurement alternates between them; each figure is the median over the rounds. It times the quantized
products on the default model's shapes (Q4_1 codes; the LM head with 8-bit codes, as the shipped file
holds it) through the integer panels, and decode attention over a float16 and a float32 cache with
blocks scattered over the pool, and checks that both builds agree.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time

import torch

from kvserve import kernels

SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576), (576, 49152)]  # (K, N): QKV, O, gate/up, down, LM head
SOURCES = ("linear.cpp", "paged_attention.cpp", "fused.cpp", "decoder.cpp")


def base_build(revision: str, isa: str):
    """The compute kernels of `revision`, built for `isa` under their own module name."""
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True)
    folder = tempfile.mkdtemp(prefix="kvserve-kernel-ab-")
    cwd = root.stdout.strip()

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout

    listed = git("ls-tree", "--name-only", f"{revision}:src/kvserve/kernels").split()
    headers = [name for name in listed if name.endswith(".h")]  # what the sources include (vec_math.h on)
    paths = []
    for name in [*SOURCES, *headers]:
        path = os.path.join(folder, name)
        with open(path, "w") as f:
            f.write(git("show", f"{revision}:src/kvserve/kernels/{name}"))
        if name in SOURCES:
            paths.append(path)
    return kernels._build(f"kvserve_base_{isa}", paths, kernels.ISA_FLAGS[isa], python_module=True)


def timed(fn, args: tuple, reps: int) -> float:
    fn(*args)
    start = time.perf_counter()
    for _ in range(reps):
        fn(*args)
    return (time.perf_counter() - start) / reps


def interleaved(builds: dict, op: str, args: tuple, rounds: int, reps: int) -> dict[str, float]:
    """Median seconds per call of each build's `op`(*args), the builds alternating every round."""
    times: dict[str, list[float]] = {name: [] for name in builds}
    for _ in range(rounds):
        for name, module in builds.items():
            times[name].append(timed(getattr(module, op), args, reps))
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="git revision to compare the working tree's kernels with")
    parser.add_argument("--isa", choices=["avx2", "avx512"], default=None, help="default: the best this CPU runs")
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 32, 512])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    isa = args.isa or kernels.best_isa()
    if isa is None:
        raise SystemExit("this CPU has no AVX2: no compiled kernels to compare")
    builds = {"base": base_build(args.base, isa), "new": kernels.compute_ops(isa)}
    print(f"{isa} build; GMAC/s base -> new (median of {args.rounds} interleaved rounds)")
    torch.manual_seed(0)
    empty = torch.empty(0)
    for m in args.rows:
        cells, total = [], {"base": 0.0, "new": 0.0}
        for k, n in SHAPES:
            if n == 49152:
                bits, codes, mins = 8, torch.randint(-128, 128, (n, k), dtype=torch.int8), empty
            else:
                bits, codes = 4, torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
                mins = (-torch.rand(n, k // 32) * 0.08).half()
            scales = (torch.rand(n, k // 32) * 0.01).half()
            x = torch.randn(m, k)
            a, b = (builds[name].q_linear(x, codes, scales, mins, empty, bits, 0) for name in ("base", "new"))
            # the builds may round x differently (int16 codes, or fp32 on AVX2 builds before the integer panels)
            assert (a - b).abs().max() <= 1e-3 * a.abs().max(), f"the builds disagree at M={m}, K={k}, N={n}"
            macs = m * k * n / 1e9
            product = (x, codes, scales, mins, empty, bits, 0)  # 0: the integer panels at every M
            seconds = interleaved(builds, "q_linear", product, args.rounds, max(1, int(0.5 / macs)))
            cells.append(f"{k}x{n} {macs / seconds['base']:5.1f} -> {macs / seconds['new']:5.1f}")
            for name in total:
                total[name] += seconds[name]
        print(f"  M={m:4d}: " + "  ".join(cells) + f"  | all five: {total['base'] / total['new']:.2f}x")
    blocks, block_size, heads, group, dim = 728, 16, 3, 3, 64  # the default model's KV heads and group
    for dtype in (torch.float16, torch.float32):
        cache = torch.randn(2, blocks, block_size, heads, dim).to(dtype)
        for batch, context in ((1, 300), (32, 192)):
            width = (context + block_size - 1) // block_size
            tables = torch.randperm(blocks)[: batch * width].view(batch, width).long().contiguous()
            lens = torch.full((batch,), context, dtype=torch.long)
            q = torch.randn(batch, heads, group, dim)
            a, b = (builds[name].decode_attention_f32(q, cache, tables, lens, 0.125) for name in ("base", "new"))
            assert (a - b).abs().max() < 1e-4, "the builds' decode attention disagrees"
            attention = (q, cache, tables, lens, 0.125)
            seconds = interleaved(builds, "decode_attention_f32", attention, args.rounds, 500 // batch)
            print(
                f"  decode attention, {str(dtype).removeprefix('torch.')} cache, batch {batch} at {context} tokens, one "
                f"layer: {seconds['base'] * 1e3:.3f} -> {seconds['new'] * 1e3:.3f} ms"
            )


if __name__ == "__main__":
    main()
