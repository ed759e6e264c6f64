"""Whether where the weights lie in memory moves kvserve's speed: the offline 32-at-once workload of
cpu_vs_llama_cpp.py (64 requests of 128 random token ids, 128 out, 32 at once, float16 KV) in one
process, timed twice with the weights as loaded, then twice after each re-placement:

- `copied`: every quantized weight tensor (codes, scales, mins) copied to fresh memory, as at load;
- `huge pages`: all of them copied, in order, into one arena aligned to 2 MiB and advised
  MADV_HUGEPAGE before its first touch (transparent huge pages, the `madvise` setting), so that their
  virtual layout, and the physical one inside each 2 MiB page, is the same in every process.

    python benchmarks/weight_placement.py [--placements copied huge-pages copied huge-pages]

Run it in several processes: within one placement the two runs agree when the machine is quiet; a
re-placement that moves the speed while the two runs around it agree is the placement's effect.
"""

from __future__ import annotations

import argparse
import mmap
import random
import time

import torch

from kvserve import LLM, SamplingParams
from kvserve.models.paths import default_model_path

HUGE_PAGE = 2 << 20


def workload_tok_s(llm: LLM, prompts: list[list[int]]) -> float:
    start = time.perf_counter()
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=128, ignore_eos=True), use_tqdm=False)
    return sum(len(o.outputs[0].token_ids) for o in outputs) / (time.perf_counter() - start)


def quantized_tensors(llm: LLM) -> list[tuple[object, str]]:
    """(QuantizedWeight, field) for every weight tensor, each weight once (the LM head may share the
    embedding's)."""
    weights = {id(m.qweight): m.qweight for m in llm.engine.runner.model.modules() if getattr(m, "qweight", None)}
    return [(q, f) for q in weights.values() for f in ("codes", "scales", "mins") if getattr(q, f) is not None]


def place(llm: LLM, huge_pages: bool) -> mmap.mmap | None:
    """Re-places the weights; returns the arena, which must outlive them."""
    fields = quantized_tensors(llm)
    slots = [(getattr(q, f).nbytes + 63) // 64 * 64 for q, f in fields]  # in the arena, each on a cache line
    arena = memory = None
    if huge_pages:
        # private: a shared anonymous mapping (Python's default) gets no transparent huge pages
        arena = mmap.mmap(-1, sum(slots) + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        memory = torch.frombuffer(arena, dtype=torch.uint8)
        offset = -memory.data_ptr() % HUGE_PAGE
        arena.madvise(mmap.MADV_HUGEPAGE, offset, sum(slots))
    for (q, f), slot in zip(fields, slots):
        tensor = getattr(q, f)
        if memory is None:
            copy = tensor.clone()
        else:
            copy = memory[offset : offset + tensor.nbytes].view(tensor.dtype).view(tensor.shape)
            copy.copy_(tensor)
            offset += slot
        setattr(q, f, copy)
    llm.engine.runner.model._decode_stack = None  # rebuilt over the new tensors on the next decode step
    return arena


def anon_huge_pages_mib() -> float:
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("AnonHugePages")) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--placements", nargs="+", choices=["copied", "huge-pages"], default=["copied", "huge-pages", "copied"]
    )
    args = parser.parse_args()
    llm = LLM(default_model_path(), kv_cache_memory="256MiB", kv_cache_dtype="float16", max_num_seqs=32)
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 40000) for _ in range(128)] for _ in range(64)]
    llm.generate([prompts[0][:32]], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # warm-up
    arenas = []
    for placement in ["as loaded", *args.placements]:
        if placement != "as loaded":
            arenas.append(place(llm, placement == "huge-pages"))
        runs = [workload_tok_s(llm, prompts) for _ in range(2)]
        print(
            f"{placement:>10}: {runs[0]:6.1f} {runs[1]:6.1f} tok/s  (AnonHugePages {anon_huge_pages_mib():.0f} MiB)",
            flush=True,
        )


if __name__ == "__main__":
    main()
