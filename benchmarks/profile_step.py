"""Where one decode step's time goes, at batch 1 and batch 32 (issue 15's profile).

    python benchmarks/profile_step.py [--batch 1 32] [--context 128] [--steps 20] [--quantization none]
                                      [--kv-cache-dtype float16]
    KVSERVE_CPU_KERNELS=0 python benchmarks/profile_step.py --quantization none   # the plain PyTorch path

Each batch size: that many requests of `--context` prompt tokens are prefilled, then decode steps
are timed (wall, per step: half with every layer in one compiled call, kernels/decoder.cpp, half
with the layers called from Python) and `--steps` / 2 more, layer by layer, are profiled with
torch.profiler (the compiled stack is one opaque call to it); the table groups the
profiler's self CPU time by what the operators do, as shares of the profiled total (the profiler adds
~10 us per operator, so at batch 1 its total exceeds the unprofiled wall time).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import torch

from kvserve import LLM, SamplingParams
from kvserve.engine import Engine
from kvserve.models.layers import use_cpu_kernels


class ProfiledOps:
    """The compiled kernels (a Python module the profiler cannot see into), each call wrapped in a
    record_function named kvserve::<kernel> so that it shows in the profile."""

    def __init__(self, ops) -> None:
        self.ops = ops

    def __getattr__(self, name: str):
        kernel = getattr(self.ops, name)

        def call(*args):
            with torch.profiler.record_function(f"kvserve::{name}"):
                return kernel(*args)

        return call


# operator name fragments -> group; first match wins
GROUPS = [
    ("quantized matmul", ("kvserve::q_linear",)),
    ("matmul (fp32)", ("aten::addmm", "aten::mm", "aten::linear", "aten::matmul", "aten::bmm", "kvserve::f32_linear")),
    ("attention", ("scaled_dot_product", "_flash_attention", "kvserve::decode_attention")),
    ("KV gather/write", ("index_select", "index_copy", "kvserve::gather")),
    ("norm / rope / act", ("rms", "rsqrt", "pow", "mean", "silu", "aten::cat", "aten::neg", "kvserve::add_rms_norm")),
    ("norm / rope / act", ("kvserve::silu_mul", "kvserve::rope_kv_write")),
    ("elementwise", ("aten::mul", "aten::add", "aten::sub", "aten::div", "aten::copy_", "aten::to", "aten::_to")),
    ("sampling / logits", ("sort", "topk", "softmax", "argmax", "multinomial", "log_softmax", "max")),
]


def group_of(name: str) -> str:
    for group, fragments in GROUPS:
        if any(f in name for f in fragments):
            return group
    return "other ops"


def profile(engine: Engine, batch: int, context: int, steps: int) -> dict:
    """Wall time per decode step (unprofiled), then the profiler's split of the same kind of steps."""
    params = SamplingParams(temperature=0.0, max_tokens=2 * steps + 8, ignore_eos=True)  # 3 + 3 x steps / 2 steps
    for i in range(batch):
        engine.add_request([(7 * i + j) % 40000 + 100 for j in range(context)], params)
    while any(
        r.num_computed_tokens < r.num_prompt_tokens for r in [*engine.scheduler.running, *engine.scheduler.waiting]
    ):
        engine.step()
    for _ in range(3):
        engine.step()
    model = engine.runner.model
    walls = {}
    for stack in (True, False):  # decode steps as one compiled call (decoder.cpp), then layer by layer
        model.use_decode_stack = stack
        start = time.perf_counter()
        for _ in range(steps // 2):
            engine.step()
        walls[stack] = (time.perf_counter() - start) / (steps // 2)
    runner, ops = engine.runner, engine.runner.compute_ops
    if ops is not None:  # the kernels made visible to the profiler, for the profiled steps only
        runner.compute_ops = ProfiledOps(ops)
        use_cpu_kernels(runner.model, runner.compute_ops)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps // 2):
            engine.step()
    if ops is not None:
        runner.compute_ops = ops
        use_cpu_kernels(runner.model, ops)
    del model.use_decode_stack  # back to the class default
    while engine.has_unfinished():
        engine.step()
    split: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        split[group_of(event.key)] += event.self_cpu_time_total / 1e3 / (steps // 2)
    accounted = sum(split.values())
    return {
        "batch": batch,
        "step_ms": walls[True] * 1e3,
        "step_ms_layer_by_layer": walls[False] * 1e3,
        "ms_by_group": dict(split),
        "profiled_ms": accounted,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--quantization", default=None)
    parser.add_argument("--kv-cache-dtype", default="auto")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    extra = {} if args.quantization is None else {"quantization": args.quantization}
    llm = LLM(args.model, dtype=args.dtype, kv_cache_memory="512MiB", kv_cache_dtype=args.kv_cache_dtype, **extra)
    results = [profile(llm.engine, b, args.context, args.steps) for b in args.batch]
    for r in results:
        total = r["profiled_ms"]
        print(
            f"\nbatch {r['batch']}: {r['step_ms']:.1f} ms per decode step (wall, unprofiled; "
            f"{r['step_ms_layer_by_layer']:.1f} ms with the layers called from Python);"
        )
        print(f"  profiled: {total:.1f} ms of operators per step (the profiler's own cost inflates short ones)")
        for group, ms in sorted(r["ms_by_group"].items(), key=lambda kv: -kv[1]):
            print(f"  {group:22s} {ms:8.2f} ms  {100 * ms / total:5.1f}% of profiled")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
