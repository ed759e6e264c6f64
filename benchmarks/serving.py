"""Serving benchmark: kvserve's server vs its own offline LLM.generate, and vs `transformers serve`, one workload.

Workload (issue 3): 64 requests of 128 prompt tokens (exact, cut with the model's tokenizer) and 128 output
tokens (EOS ignored), greedy, completions endpoint, streaming.
  1. throughput: kvserve server at concurrency 32 vs offline LLM.generate of the same prompts with
     max_num_seqs 32 (the same batch limit), target: server >= 0.9 x offline output tokens/s;
  2. latency: kvserve server at concurrency 8, target: TTFT p99 < 2 x TTFT p50;
  3. `transformers serve --continuous-batching` on the same weights at concurrency 32 and 8, with the ratios.
Each system runs alone (servers are started and stopped in turn; the offline run happens with no server up).

transformers serve cannot load the default GGUF file itself (its config has no `architectures`), so the GGUF is
dequantized once to a float32 safetensors folder under benchmarks/out/ (the same weights kvserve dequantizes
to); nothing is downloaded.

    python benchmarks/serving.py              # full run: minutes, needs a quiet machine
    python benchmarks/serving.py --quick      # 8 requests x 16 tokens: checks the script
    python benchmarks/serving.py --skip-transformers
Results: benchmarks/out/serving.json and one PNG per run (latency percentiles, throughput over time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import time

from kvserve.bench import bench_namespace, format_summary, load_tokenizer, make_prompts, plot, run_benchmark, summarize
from kvserve.server.launch import ServerProcess, free_port

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "out")


def serve_bench(url: str, name: str, prompts: list[str], concurrency: int, args, backend: str) -> dict:
    settings = bench_namespace(
        base=url, concurrency=concurrency, output_len=args.output_len, backend=backend, num_requests=len(prompts)
    )
    results, start, end = asyncio.run(run_benchmark(settings, prompts))
    summary = summarize(results, start, end)
    print(f"\n== {name}, concurrency {concurrency}\n{format_summary(summary)}", flush=True)
    plot(results, summary, start, os.path.join(OUT, f"serving_{name}_c{concurrency}.png"), f"{name}, c={concurrency}")
    return summary


def run_kvserve_server(prompts: list[str], args) -> dict:
    engine_args = ["--kv-cache-memory", args.kv_cache_memory, "--max-model-len", "2048", "--log-stats-interval", "5"]
    with ServerProcess(engine_args) as server:
        return {f"c{c}": serve_bench(server.url, "kvserve", prompts, c, args, "openai") for c in args.concurrency}


def run_offline(prompts: list[str], args, max_num_seqs: int) -> dict:
    from kvserve import LLM, SamplingParams

    llm = LLM(kv_cache_memory=args.kv_cache_memory, max_model_len=2048, max_num_seqs=max_num_seqs)
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    result = {"max_num_seqs": max_num_seqs, "output_tokens": tokens, "seconds": elapsed}
    result["output_tokens_per_s"] = tokens / elapsed
    print(f"\n== offline LLM.generate, max_num_seqs {max_num_seqs}: {result['output_tokens_per_s']:.1f} tokens/s")
    del llm
    return result


def hf_folder() -> str:
    """The default GGUF model dequantized to a safetensors folder transformers serve can load (made once)."""
    folder = os.path.join(OUT, "smollm2-135m-instruct-hf")
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        return folder
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvserve.models.paths import default_model_path

    directory, file = os.path.split(default_model_path())
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=file)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=file, dtype=torch.float32)
    tmp = folder + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    model.config.architectures = [type(model).__name__]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # the weights saved are plain float32
    model.config.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    save_model(model, os.path.join(tmp, "model.safetensors"))  # handles the tied embedding
    os.replace(tmp, folder)
    return folder


def run_transformers_server(prompts: list[str], args) -> dict:
    exe = shutil.which("transformers") or os.path.join(os.path.dirname(sys.executable), "transformers")
    if not os.path.exists(exe):
        return {"skipped": "no `transformers` command"}
    folder = hf_folder()
    port = free_port()
    cmd = [exe, "serve", folder, "--port", str(port), "--host", "127.0.0.1", "--device", "cpu", "--dtype", "float32"]
    cmd.append("--continuous-batching")
    with ServerProcess([], port=port, command=cmd) as server:
        return {
            f"c{c}": serve_bench(server.url, "transformers", prompts, c, args, "transformers") for c in args.concurrency
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--concurrency", default="32,8", help="comma-separated; the first is the throughput run")
    parser.add_argument("--kv-cache-memory", default="2GiB")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--quick", action="store_true", help="8 requests x 32 prompt x 16 output tokens, c=4,2")
    args = parser.parse_args()
    if args.quick:
        args.num_requests, args.prompt_len, args.output_len, args.concurrency = 8, 32, 16, "4,2"
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    os.makedirs(OUT, exist_ok=True)
    os.environ["HF_HUB_OFFLINE"] = "1"
    prompts = make_prompts(args.num_requests, args.prompt_len, seed=0, tokenizer=load_tokenizer("default"))

    results: dict = {"workload": {k: v for k, v in vars(args).items()}}
    results["kvserve_server"] = run_kvserve_server(prompts, args)
    results["kvserve_offline"] = run_offline(prompts, args, max_num_seqs=args.concurrency[0])
    if not args.skip_transformers:
        try:
            results["transformers_server"] = run_transformers_server(prompts, args)
        except Exception as exc:  # noqa: BLE001 - report the comparison as missing, keep kvserve's results
            results["transformers_server"] = {"skipped": f"{type(exc).__name__}: {exc}"}

    c_tp, c_lat = f"c{args.concurrency[0]}", f"c{args.concurrency[-1]}"
    server, offline = results["kvserve_server"], results["kvserve_offline"]
    ratios = {
        "server_over_offline_tokens_per_s": server[c_tp]["output_tokens_per_s"] / offline["output_tokens_per_s"],
        "ttft_p99_over_p50": server[c_lat]["ttft_p99_ms"] / server[c_lat]["ttft_p50_ms"],
    }
    hf = results.get("transformers_server", {})
    if c_tp in hf:
        ratios["kvserve_over_transformers_tokens_per_s"] = (
            server[c_tp]["output_tokens_per_s"] / hf[c_tp]["output_tokens_per_s"]
        )
        ratios["transformers_ttft_p99_over_p50"] = hf[c_lat]["ttft_p99_ms"] / hf[c_lat]["ttft_p50_ms"]
    results["ratios"] = ratios
    with open(os.path.join(OUT, "serving.json"), "w") as f:
        json.dump(results, f, indent=2)
    print("\n== ratios")
    for key, value in ratios.items():
        print(f"{key:42} {value:.3f}")
    print(
        f"targets: server_over_offline >= 0.9 ({'met' if ratios['server_over_offline_tokens_per_s'] >= 0.9 else 'MISSED'}),"
        f" ttft_p99_over_p50 < 2 ({'met' if ratios['ttft_p99_over_p50'] < 2 else 'MISSED'})"
    )


if __name__ == "__main__":
    main()
