"""Offline throughput: kvserve LLM.generate vs Hugging Face transformers, same weights, one run.

Workload: N prompts of ~P tokens, O new tokens each (ignore_eos / min_new_tokens),
greedy. Each system runs in its own subprocess so that its peak RSS is its own.
Reported: output tokens/s (wall time from submission to the last token, prefill
included), batch-1 decode tokens/s, peak RSS, and kvserve / transformers ratios.

    python benchmarks/offline_throughput.py                 # full run (several minutes)
    python benchmarks/offline_throughput.py --quick         # smoke test
    python benchmarks/offline_throughput.py --device cuda --num-prompts 256 --batch-sizes 64,256

On CUDA both systems run in bf16 (kvserve's default there; the GGUF's blocks expanded once at load) and
the GPU's peak allocated memory is reported beside the process's RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def make_prompts(tokenizer_encode, count: int, length: int, seed: int = 0) -> list[list[int]]:
    """Distinct prompts of exactly `length` tokens from a fixed English word list."""
    rng = random.Random(seed)
    words = open(os.path.join(HERE, "words.txt")).read().split()
    prompts = []
    for _ in range(count):
        ids: list[int] = []
        while len(ids) < length:
            ids += tokenizer_encode(" " + " ".join(rng.choice(words) for _ in range(32)))
        prompts.append(ids[:length])
    return prompts


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_gpu_mib(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None


# ---------------------------------------------------------------- workers (one system per process)


def run_kvserve(args) -> dict:
    from kvserve import LLM, SamplingParams

    llm = LLM(device=args.device, kv_cache_memory=args.kv_cache_memory, max_num_seqs=args.num_prompts)
    prompts = make_prompts(llm.tokenizer.encode, args.num_prompts, args.prompt_len)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    # batch-1 decode: time per token after the first, one request alone
    single = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    out = llm.generate([prompts[0]], single, use_tqdm=False)[0]
    m = out.metrics
    decode_tps = (args.output_len - 1) / (m.finish_time - m.first_token_time)
    return {
        "system": "kvserve",
        "output_tokens": generated,
        "seconds": elapsed,
        "output_tokens_per_s": generated / elapsed,
        "batch1_decode_tokens_per_s": decode_tps,
        "num_preemptions": llm.get_stats()["num_preemptions"],
        "peak_rss_mib": peak_rss_mib(),
        "peak_gpu_mib": peak_gpu_mib(args.device),
    }


def load_hf(device: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvserve.models.paths import default_model_path

    folder, file = os.path.split(default_model_path())
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32  # each device's kvserve default
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=dtype).eval().to(device)
    return tokenizer, model


def run_hf_generate(args) -> dict:
    import torch

    tokenizer, model = load_hf(args.device)
    prompts = make_prompts(lambda s: tokenizer.encode(s, add_special_tokens=False), args.num_prompts, args.prompt_len)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def tensor(rows: list[list[int]]) -> torch.Tensor:
        return torch.tensor(rows, device=args.device)

    with torch.no_grad():
        model.generate(tensor([prompts[0]]), max_new_tokens=2, do_sample=False, pad_token_id=pad)  # warm-up
        start = time.perf_counter()
        generated = 0
        for i in range(0, len(prompts), args.batch_size):
            chunk = prompts[i : i + args.batch_size]  # equal lengths: left padding is a no-op here
            input_ids = tensor(chunk)
            out = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=args.output_len,
                min_new_tokens=args.output_len,
                do_sample=False,
                pad_token_id=pad,
            )
            generated += (out.shape[1] - input_ids.shape[1]) * len(chunk)
        elapsed = time.perf_counter() - start
        result = {
            "system": f"transformers generate (batch {args.batch_size})",
            "output_tokens": generated,
            "seconds": elapsed,
            "output_tokens_per_s": generated / elapsed,
            "peak_rss_mib": peak_rss_mib(),
            "peak_gpu_mib": peak_gpu_mib(args.device),
        }
        if args.batch1:
            ids = tensor([prompts[0]])
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=pad)
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=pad)
            prefill = time.perf_counter() - t0
            t0 = time.perf_counter()
            model.generate(
                ids, max_new_tokens=args.output_len, min_new_tokens=args.output_len, do_sample=False, pad_token_id=pad
            )
            total = time.perf_counter() - t0
            result["batch1_decode_tokens_per_s"] = (args.output_len - 1) / (total - prefill)
    return result


def run_hf_continuous(args) -> dict:
    import torch
    from transformers import GenerationConfig

    tokenizer, model = load_hf(args.device)
    if not hasattr(model, "generate_batch"):
        return {"system": "transformers generate_batch", "skipped": "not in this transformers version"}
    prompts = make_prompts(lambda s: tokenizer.encode(s, add_special_tokens=False), args.num_prompts, args.prompt_len)
    config = GenerationConfig(
        max_new_tokens=args.output_len,
        min_new_tokens=args.output_len,
        do_sample=False,
        eos_token_id=-1,
        pad_token_id=tokenizer.pad_token_id or 0,
    )
    with torch.no_grad():
        start = time.perf_counter()
        outputs = model.generate_batch(inputs=prompts, generation_config=config)
        elapsed = time.perf_counter() - start
    generated = sum(len(o.generated_tokens) for o in outputs.values())
    return {
        "system": "transformers generate_batch (continuous batching)",
        "output_tokens": generated,
        "seconds": elapsed,
        "output_tokens_per_s": generated / elapsed,
        "peak_rss_mib": peak_rss_mib(),
    }


WORKERS = {"kvserve": run_kvserve, "hf-generate": run_hf_generate, "hf-continuous": run_hf_continuous}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--batch-sizes", default="32,64", help="transformers generate batch sizes to try")
    parser.add_argument("--kv-cache-memory", default="2GiB")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (both systems on it)")
    parser.add_argument("--skip-continuous", action="store_true")
    parser.add_argument("--quick", action="store_true", help="8 prompts x 16 tokens, to check the script")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, default=32, help=argparse.SUPPRESS)
    parser.add_argument("--batch1", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.num_prompts, args.prompt_len, args.output_len, args.batch_sizes = 8, 32, 16, "8"
    if args.worker:
        print("RESULT " + json.dumps(WORKERS[args.worker](args)), flush=True)
        return

    def worker(name: str, *extra: str) -> dict:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            name,
            "--num-prompts",
            str(args.num_prompts),
            "--prompt-len",
            str(args.prompt_len),
            "--output-len",
            str(args.output_len),
            "--kv-cache-memory",
            args.kv_cache_memory,
            "--device",
            args.device,
            *extra,
        ]
        print("running", " ".join(cmd[2:]), file=sys.stderr, flush=True)
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode != 0 or not lines:
            raise RuntimeError(f"worker {name} failed:\n{out.stderr[-3000:]}")
        result = json.loads(lines[-1][len("RESULT ") :])
        print(json.dumps(result), file=sys.stderr, flush=True)
        return result

    results = [worker("kvserve")]
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    for i, size in enumerate(sizes):
        results.append(worker("hf-generate", "--batch-size", str(size), *(["--batch1"] if i == 0 else [])))
    if not args.skip_continuous:
        results.append(worker("hf-continuous"))

    ours = results[0]
    best_hf = max(
        (r for r in results[1:] if r["system"].startswith("transformers generate (")),
        key=lambda r: r["output_tokens_per_s"],
    )
    hf_b1 = next(
        r["batch1_decode_tokens_per_s"] for r in results if "batch1_decode_tokens_per_s" in r and r is not ours
    )
    print(
        f"\nworkload: {args.num_prompts} prompts x {args.prompt_len} tokens, {args.output_len} new tokens each, greedy, "
        f"on {args.device}"
    )
    print(f"{'system':55s} {'out tok/s':>10s} {'seconds':>8s} {'peak RSS MiB':>13s}")
    for r in results:
        if "skipped" in r:
            print(f"{r['system']:55s} skipped: {r['skipped']}")
            continue
        print(f"{r['system']:55s} {r['output_tokens_per_s']:10.1f} {r['seconds']:8.1f} {r['peak_rss_mib']:13.0f}")
    print(
        f"\nthroughput ratio kvserve / best transformers generate: {ours['output_tokens_per_s'] / best_hf['output_tokens_per_s']:.2f}x"
    )
    print(
        f"batch-1 decode: kvserve {ours['batch1_decode_tokens_per_s']:.1f} tok/s, transformers {hf_b1:.1f} tok/s, "
        f"ratio {ours['batch1_decode_tokens_per_s'] / hf_b1:.2f}x"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
