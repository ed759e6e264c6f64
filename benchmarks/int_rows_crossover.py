"""Where the integer panels overtake the row-wise integer path in whole decode steps (what
kernels/linear.cpp's kDefaultIntRows rests on): per batch size, decode steps of the default model with
the row-wise path up to each of two row counts, the two settings alternating in one process.

    python benchmarks/int_rows_crossover.py --batch 4 5 6 8 --rows 8 3
    KVSERVE_CPU_KERNELS=avx2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/int_rows_crossover.py ...

Each round adds `batch` requests of 128 random token ids (64 tokens out, float16 KV, the served
setting of cpu_vs_llama_cpp.py), prefills them, and times the decode steps until they finish; each
figure is the median over the rounds. One LLM per setting: layers.INT_KERNEL_MAX_ROWS is read when a
product runs and when the compiled decode stack is built, so it is set before each setting's round
and the stack rebuilt. Unlike benchmarks/linear_kernels.py, every weight is read from memory as in
serving (the model's 91 MB do not stay in the caches).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import kvserve.models.layers as layers
from kvserve import LLM, SamplingParams
from kvserve.models.paths import default_model_path


def decode_step_ms(llm: LLM, max_int_rows: int, batch: int, rng: random.Random) -> float:
    layers.INT_KERNEL_MAX_ROWS = max_int_rows
    engine = llm.engine
    engine.runner.model._decode_stack = None  # rebuilt with this setting on the next decode step
    params = SamplingParams(temperature=0, max_tokens=65, ignore_eos=True)
    for _ in range(batch):
        engine.add_request([rng.randrange(100, 40000) for _ in range(128)], params)
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running) or (
        engine.scheduler.waiting
    ):
        engine.step()  # the prefills (and their first tokens)
    start, steps = time.perf_counter(), 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[4, 5, 6, 8])
    parser.add_argument("--rows", type=int, nargs=2, default=[8, 3], help="two row-wise limits to compare")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    llms = {
        rows: LLM(default_model_path(), kv_cache_memory="256MiB", kv_cache_dtype="float16", max_num_seqs=32)
        for rows in args.rows
    }
    rng = random.Random(0)
    first, second = args.rows
    for batch in args.batch:
        times: dict[int, list[float]] = {rows: [] for rows in llms}
        for _ in range(args.rounds):
            for rows, llm in llms.items():
                times[rows].append(decode_step_ms(llm, rows, batch, rng))
        a, b = statistics.median(times[first]), statistics.median(times[second])
        print(
            f"batch {batch:3d}: decode step {a:5.1f} ms (row-wise up to {first} rows) -> {b:5.1f} ms "
            f"(up to {second}): {a / b:.2f}x",
            flush=True,
        )


if __name__ == "__main__":
    main()
