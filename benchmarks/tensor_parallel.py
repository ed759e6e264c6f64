"""What tensor parallelism costs on one CPU machine: TP=2 (one core per rank, gloo over 127.0.0.1)
against TP=1 (both cores in one process), on the same model and workloads.

On 2 cores TP cannot be faster than one process: both use the same cores, and TP adds two
all-reduces per layer (plus the embedding's and the logits' gather). This measures that price:
- batch 1: one 128-token prompt, 128 tokens out; decode tokens/s (prefill timed apart);
- batch 32: 32 prompts of 128 tokens, 64 out each; output tokens/s;
- on rank 0, the time spent inside collectives per step (the all-reduce itself plus waiting for the
  other rank to reach it), and a bare all-reduce of one step's activations, timed alone, through
  gloo and through shared memory (what the ranks of one machine use).
TP=1 also runs with its layers from Python, as TP does (the compiled decode stack runs no collectives),
to tell the price of the collectives from that of the Python layers.

The model: random fp32 weights in SmolLM2-135M's sizes (576 hidden, 30 layers, 1536 MLP, 49,152
vocabulary, tied) with 12 query heads of 48 and 4 KV heads, so that 2 ranks split it (SmolLM2's 9
heads do not split in 2). Each configuration runs in its own process.

    python benchmarks/tensor_parallel.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=12,
    num_key_value_heads=4,
    head_dim=48,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)


def build_model(folder: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPES, bos_token_id=1, eos_token_id=2))
    model.save_pretrained(folder)


def measure(folder: str, tp: int, decode_stack: bool) -> dict:
    """Runs in a fresh process: one configuration's figures."""
    import torch

    from kvserve import LLM, SamplingParams
    from kvserve.distributed.group import ParallelGroup
    from kvserve.models.llama import LlamaForCausalLM

    LlamaForCausalLM.use_decode_stack = decode_stack  # TP turns it off: it runs no collectives
    collective = {"seconds": 0.0, "calls": 0}
    for name in ("all_reduce", "gather_vocab"):
        original = getattr(ParallelGroup, name)

        def timed(self, x, _original=original):
            start = time.perf_counter()
            try:
                return _original(self, x)
            finally:
                collective["seconds"] += time.perf_counter() - start
                collective["calls"] += 1

        setattr(ParallelGroup, name, timed)

    extra = {"tensor_parallel_size": tp} if tp > 1 else {"num_threads": 2}
    llm = LLM(folder, kv_cache_memory="512MiB", enable_prefix_caching=False, **extra)
    prompt = [int(t) for t in torch.randint(3, 49000, (128,), generator=torch.Generator().manual_seed(1))]
    greedy = dict(temperature=0, ignore_eos=True)
    llm.generate([prompt], SamplingParams(max_tokens=8, **greedy))  # warm-up
    result: dict = {"tp": tp}

    def run(prompts, max_tokens) -> tuple[float, int, float]:
        collective["seconds"], collective["calls"] = 0.0, 0
        steps = llm.engine.stats.num_steps
        start = time.perf_counter()
        llm.generate(prompts, SamplingParams(max_tokens=max_tokens, **greedy))
        seconds = time.perf_counter() - start
        return seconds, llm.engine.stats.num_steps - steps, collective["seconds"]

    prefill, _, _ = run([prompt], 1)
    total, steps, coll = run([prompt], 129)
    result["batch1_prefill_ms"] = prefill * 1000
    result["batch1_decode_tok_s"] = 128 / (total - prefill)
    result["batch1_collective_ms_per_step"] = coll / steps * 1000
    result["batch1_ms_per_step"] = total / steps * 1000
    prompts = [[(t + i) % 49000 + 3 for t in prompt] for i in range(32)]
    total, steps, coll = run(prompts, 64)
    result["batch32_output_tok_s"] = 32 * 64 / total
    result["batch32_collective_ms_per_step"] = coll / steps * 1000
    result["batch32_ms_per_step"] = total / steps * 1000
    llm.close()
    return result


def bare_all_reduce(rank: int, port: int, queue) -> None:
    """Two processes, one core each: all-reduces of [rows, 576] fp32 (one layer's o_proj output), through
    gloo's loopback TCP and through kvserve's shared memory (distributed/shm.py)."""
    import torch
    import torch.distributed as dist

    from kvserve.distributed.group import ParallelGroup

    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[rank % len(os.sched_getaffinity(0))]})
    torch.set_num_threads(1)
    group = ParallelGroup.join(rank, 2, f"tcp://127.0.0.1:{port}", torch.device("cpu"), same_machine=True)
    times = {}
    for name, reduce in (("gloo", dist.all_reduce), ("shared memory", group.all_reduce)):
        for rows in (1, 32, 512):
            x = torch.randn(rows, SHAPES["hidden_size"])
            for _ in range(50):
                reduce(x)
            n = 500 if rows < 512 else 100
            start = time.perf_counter()
            for _ in range(n):
                reduce(x)
            times[f"{name} [{rows}, 576]"] = (time.perf_counter() - start) / n * 1e6
    if rank == 0:
        queue.put(times)
    group.leave()


def bare_collectives() -> dict:
    import torch.multiprocessing as mp

    from kvserve.server.launch import free_port

    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    procs = [context.Process(target=bare_all_reduce, args=(rank, port, queue)) for rank in range(2)]
    for p in procs:
        p.start()
    times = queue.get(timeout=300)
    for p in procs:
        p.join()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None)
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # internal: "folder:tp"
    args = parser.parse_args()
    if args.measure:
        folder, tp, stack = args.measure.rsplit(":", 2)
        print(json.dumps(measure(folder, int(tp), stack == "stack")))
        return
    with tempfile.TemporaryDirectory() as folder:
        build_model(folder)
        results = []
        for tp, stack in ((1, "stack"), (1, "layers"), (2, "layers")):
            out = subprocess.run(
                [sys.executable, __file__, "--measure", f"{folder}:{tp}:{stack}"],
                capture_output=True,
                text=True,
                check=True,
            )
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    bare = bare_collectives()
    one, python_layers, two = results
    print(
        f"{'':38} {'TP=1 (2 threads)':>18} {'TP=1, layers from Python':>25} {'TP=2 (1 core/rank)':>20} "
        f"{'TP=2 / TP=1':>12}"
    )
    for key, label in (
        ("batch1_decode_tok_s", "batch 1: decode tok/s"),
        ("batch1_prefill_ms", "batch 1: 128-token prefill ms"),
        ("batch1_ms_per_step", "batch 1: ms per step"),
        ("batch1_collective_ms_per_step", "batch 1: in collectives, ms per step"),
        ("batch32_output_tok_s", "batch 32: output tok/s"),
        ("batch32_ms_per_step", "batch 32: ms per step"),
        ("batch32_collective_ms_per_step", "batch 32: in collectives, ms per step"),
    ):
        ratio = two[key] / one[key] if one[key] else float("nan")
        print(f"{label:38} {one[key]:>18.2f} {python_layers[key]:>25.2f} {two[key]:>20.2f} {ratio:>11.2f}x")
    for what, micros in bare.items():
        print(f"bare all-reduce, {what} fp32: {micros:.0f} us (x 61 per step: {61 * micros / 1000:.2f} ms)")
    if args.json:
        report = {"tp1": one, "tp1_python_layers": python_layers, "tp2": two, "bare_all_reduce_us": bare}
        with open(args.json, "w") as f:
            json.dump({**report, "shapes": SHAPES}, f, indent=2)


if __name__ == "__main__":
    main()
