"""Tensor parallelism on the CPU: TP=2 (gloo over 127.0.0.1, the second rank spawned by the engine)
against TP=1 on tiny random models.

Tolerance: a rank sums its half of each row-parallel product (o_proj, down_proj) and the all-reduce
adds the halves, where TP=1 sums the whole row in one pass: the same terms in another order, so
fp32 round-off (~1e-7 relative per sum) differs, not the maths. Over 3 layers the logprobs agree to
~1e-5; the tests allow 1e-4 (2e-3 with quantized weights, see QUANTIZED_TOL). A wrong shard (a head or
a vocabulary range off by one) moves them by O(1).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
from helpers import save_tiny_deepseek, save_tiny_model, write_gguf

from kvserve import LLM, SamplingParams
from kvserve.distributed.group import RankFailed
from kvserve.server.launch import ServerProcess, free_port

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")

TOL = 1e-4
# Quantized weights: the kernels round each 32-element block of activations to int16 codes, so an input
# that differs by the all-reduce's round-off can round to the next code (a step of 1/32767 of the block's
# largest value): ~3e-5 relative per layer, ~1e-3 on the logprobs at most. A wrong split moves them by O(1).
QUANTIZED_TOL = 2e-3
PROMPTS = [list(range(5, 45)), [11, 12, 13] * 9, [20, 30, 40, 50, 60], list(range(100, 170))]


LOGPROBS = 3


def _run(llm: LLM) -> list:
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True, logprobs=LOGPROBS, prompt_logprobs=LOGPROBS)
    return llm.generate(PROMPTS, params)


def _assert_same(reference: list, tp: list, tol: float = TOL) -> None:
    for ref, out in zip(reference, tp):
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
        for ref_lp, lp in zip(
            ref.outputs[0].logprobs + ref.prompt_logprobs[1:], out.outputs[0].logprobs + out.prompt_logprobs[1:]
        ):
            assert max(abs(ref_lp[t] - lp[t]) for t in ref_lp.keys() & lp.keys()) < tol
            # A token in one top 3 only: a near tie at the cut (the two runs' round-off ordered two tokens
            # within tol of each other differently), so it sits within tol of the other's third entry
            # (not its last: the sampled token is listed too, from below the top 3 where it was not in it).
            for one, other in ((ref_lp, lp), (lp, ref_lp)):
                cut = sorted(other.values(), reverse=True)[LOGPROBS - 1]
                for token in one.keys() - other.keys():
                    assert abs(one[token] - cut) < tol, (token, one, other)


@pytest.mark.parametrize(
    "kind, overrides",
    [("llama", {"num_key_value_heads": 4}), ("llama", {"num_key_value_heads": 1}), ("qwen2", {})],
    ids=["llama-4-kv-heads", "llama-1-kv-head", "qwen2-biases"],
)
def test_tp2_equals_tp1(tmp_path, kind, overrides):
    save_tiny_model(str(tmp_path), kind, seed=5, **overrides)
    kv_heads = overrides.get("num_key_value_heads", 2)
    # 14 blocks of 16 tokens per rank: the four requests need 4 + 3 + 3 + 7 blocks at their ends
    bytes_per_block = 2 * 3 * 16 * 16 * 4 * kv_heads  # K and V, 3 layers, 16 tokens, head_dim 16, fp32
    # chunked prefill (16-token chunks), and a pool too small for all four requests at once: preemption
    engine = {"kv_cache_memory": 14 * bytes_per_block, "max_num_batched_tokens": 16}
    with LLM(str(tmp_path), **engine) as llm:
        reference = _run(llm)
        assert llm.get_stats()["num_preemptions"] > 0
        reference_shape = llm.engine.runner.kv_caches[0].shape
    # the same budget per rank: a rank stores half the KV heads, so twice the blocks (the same with 1 KV head)
    per_rank_heads = kv_heads // 2 if kv_heads >= 2 else 1
    tp_budget = engine["kv_cache_memory"] * per_rank_heads // kv_heads
    with LLM(str(tmp_path), **{**engine, "kv_cache_memory": tp_budget}, tensor_parallel_size=2) as llm:
        cache = llm.engine.runner.kv_caches[0]
        assert cache.shape[1] == reference_shape[1] and cache.shape[3] == per_rank_heads  # same blocks, its heads
        assert cache.nbytes == cache.shape[1] * bytes_per_block // 3 * per_rank_heads // kv_heads
        _assert_same(reference, _run(llm))
        assert llm.get_stats()["num_preemptions"] > 0


@pytest.mark.parametrize("kind", ["v2", "v3-nolora"])
def test_tp2_equals_tp1_deepseek_mla(tmp_path, kind):
    """MLA with MoE (dense first layer, routed + shared experts): heads and expert rows split, the latent
    cache replicated, so each rank's KV is the whole model's. v3-nolora: attention biases (o_proj's is
    summed once) and a q without LoRA."""
    save_tiny_deepseek(str(tmp_path), kind, seed=2)
    # 12 blocks of 16 tokens x 3 layers x (32 latent + 8 rope) x fp32: the four requests need ~18, so some are
    # preempted; 16-token chunks
    engine = {"kv_cache_memory": 12 * 16 * 3 * 40 * 4, "max_num_batched_tokens": 16}
    with LLM(str(tmp_path), **engine) as llm:
        reference = _run(llm)
        assert llm.get_stats()["num_preemptions"] > 0
        reference_cache = llm.engine.runner.kv_caches[0]
        assert llm.engine.kv.pool.num_blocks == 12
    with LLM(str(tmp_path), **engine, tensor_parallel_size=2) as llm:
        assert llm.engine.kv.pool.num_blocks == 12  # the same budget holds the same blocks: replicated
        assert llm.engine.runner.kv_caches[0].shape == reference_cache.shape
        _assert_same(reference, _run(llm))
        assert llm.get_stats()["num_preemptions"] > 0


@pytest.mark.parametrize("form", ["gguf Q4_1", "int8"])
def test_tp2_equals_tp1_quantized(tmp_path, form):
    """Quantized weights stay quantized per rank: a GGUF's Q4_1 blocks are cut at whole 32-element groups
    (o_proj's and down_proj's inputs) or whole rows; --quantization int8 quantizes each rank's slice, whose
    groups are the whole model's. 64 MLP rows and 2 heads of 16 per rank: whole groups."""
    model = save_tiny_model(str(tmp_path), "llama", seed=4, intermediate_size=128)
    if form == "int8":
        path, extra = str(tmp_path), {"quantization": "int8"}
    else:
        path, extra = str(tmp_path / "tiny.gguf"), {}
        write_gguf(path, model, "llama", quant="Q4_1")
    engine = {"kv_cache_memory": "2MiB", "max_num_batched_tokens": 16, **extra}
    with LLM(path, **engine) as llm:
        assert any(m.qweight is not None for m in llm.engine.runner.model.modules() if hasattr(m, "qweight"))
        reference = _run(llm)
    with LLM(path, **engine, tensor_parallel_size=2) as llm:
        o_proj = llm.engine.runner.model.layers[0].self_attn.o_proj
        assert o_proj.qweight is not None and o_proj.qweight.shape == (64, 32)  # its half of the inputs
        _assert_same(reference, _run(llm), QUANTIZED_TOL)


def test_four_ranks_share_one_kv_head(tmp_path):
    """TP=4 over 1 KV head: one query head a rank, the KV head replicated on all four (on 2 cores the ranks
    take turns: a few tokens only)."""
    save_tiny_model(str(tmp_path), "llama", seed=9, num_key_value_heads=1)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=2)
    prompts = PROMPTS[:2]
    with LLM(str(tmp_path), kv_cache_memory="1MiB") as llm:
        reference = llm.generate(prompts, params)
    with LLM(str(tmp_path), kv_cache_memory="1MiB", tensor_parallel_size=4) as llm:
        assert len(llm.engine.tp.processes) == 3 and llm.engine.runner.kv_caches[0].shape[3] == 1
        result = llm.generate(prompts, params)
    for ref, out in zip(reference, result):
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
        for ref_lp, lp in zip(ref.outputs[0].logprobs, out.outputs[0].logprobs):
            assert max(abs(ref_lp[t] - lp[t]) for t in ref_lp) < TOL


def test_kv_bytes_per_rank(tmp_path):
    """4 KV heads over 2 ranks: each rank's cache is half the model's, so one budget holds 2x the blocks."""
    cores_before = os.sched_getaffinity(0)
    save_tiny_model(str(tmp_path), "llama", num_key_value_heads=4)
    block_bytes = 2 * 3 * 16 * 4 * 16 * 4  # K and V, 3 layers, 16 tokens, 4 heads of 16, fp32
    with LLM(str(tmp_path), kv_cache_memory=40 * block_bytes) as one:
        assert one.engine.kv.pool.num_blocks == 40
    with LLM(str(tmp_path), kv_cache_memory=40 * block_bytes, tensor_parallel_size=2) as two:
        assert two.engine.kv.pool.num_blocks == 80
        cache = two.engine.runner.kv_caches[0]  # rank 0's first layer: [2, 80, 16, 2, 16]
        assert tuple(cache.shape) == (2, 80, 16, 2, 16) and cache.nbytes * 3 == 40 * block_bytes
    assert os.sched_getaffinity(0) == cores_before  # rank 0's pinning ends with the engine


def test_int8_kv_and_forked_samples(tmp_path):
    """int8 KV (each rank quantizes its heads' blocks and keeps their recent windows) with n=3 samples
    per prompt, whose forks copy blocks and windows on every rank: the same tokens as TP=1."""
    save_tiny_model(str(tmp_path), "llama", seed=6)
    params = SamplingParams(n=3, temperature=0.8, seed=11, max_tokens=24, ignore_eos=True)
    outputs = []
    for tp in (1, 2):
        with LLM(str(tmp_path), kv_cache_dtype="int8", kv_cache_memory="2MiB", tensor_parallel_size=tp) as llm:
            assert llm.engine.runner.windows
            result = llm.generate(PROMPTS[:3], params)
            outputs.append([[c.token_ids for c in o.outputs] for o in result])
            llm.engine.check_idle()
    assert outputs[0] == outputs[1]


def test_tiers_move_every_ranks_shard(tmp_path):
    """Host and disk tiers under TP=2: a tier's row is every rank's part of the block, so the working set
    beyond the device pool comes back from host and disk exactly as at TP=1; the disk tier survives a
    restart at TP=2, and a TP=1 engine never reads what two ranks wrote (the hash chain's root differs)."""
    model = tmp_path / "model"
    save_tiny_model(str(model), "llama")
    block = 2 * 3 * 16 * 2 * 16 * 4  # K and V, 3 layers, 16 tokens, 2 KV heads of 16, fp32: one block, all ranks

    def tiered(tp: int, disk, host_blocks: int | None = 12) -> LLM:
        return LLM(
            str(model),
            kv_cache_memory=16 * block // tp,  # 16 blocks on every rank (a rank holds 1/tp of each)
            kv_offload_memory=host_blocks * block if host_blocks else None,
            kv_offload_dir=str(disk),
            kv_offload_disk=400 * (block + 4096),
            max_model_len=128,
            max_num_batched_tokens=512,  # the counts below: 5 of 6 prompts prefilled in the first step
            tensor_parallel_size=tp,
        )

    g = torch.Generator().manual_seed(0)
    work = [torch.randint(3, 320, (96,), generator=g).tolist() for _ in range(6)]  # 36 blocks > 16
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    runs = {}
    for tp in (1, 2):
        with tiered(tp, tmp_path / f"disk{tp}") as llm:
            first = llm.generate(work, greedy)
            second = llm.generate(work[::-1], greedy)[::-1]  # newest first: device, host and disk all hit
            stats = llm.get_stats()
            assert [o.num_cached_tokens for o in second] == [80] * 6
            assert (stats["kv_offload_host_hit_tokens"], stats["kv_offload_disk_hit_tokens"]) == (80, 240)
            runs[tp] = [[o.outputs[0].token_ids for o in out] for out in (first, second)]
            llm.engine.check_idle()
    assert runs[1] == runs[2] and runs[2][0] == runs[2][1]
    with tiered(2, tmp_path / "disk2", host_blocks=None) as restarted:
        assert [o.outputs[0].token_ids for o in restarted.generate(work, greedy)] == runs[1][0]
        assert restarted.get_stats()["kv_offload_disk_hit_tokens"] == 6 * 80
    with tiered(1, tmp_path / "disk2", host_blocks=None) as stranger:
        stranger.generate(work, greedy)
        assert stranger.get_stats()["prefix_cache_hits"] == 0


def test_refusals(tmp_path):
    save_tiny_model(str(tmp_path), "llama")  # 4 query heads, 2 KV heads
    with pytest.raises(ValueError, match="does not divide the model's 4 attention heads"):
        LLM(str(tmp_path), tensor_parallel_size=3)
    with pytest.raises(ValueError, match="tensor-parallel options"):
        LLM(str(tmp_path), master_port=29500)
    with pytest.raises(ValueError, match="needs master_port"):
        LLM(str(tmp_path), tensor_parallel_size=2, nnodes=2, device="cpu")
    with pytest.raises(ValueError, match="needs an explicit device"):
        LLM(str(tmp_path), tensor_parallel_size=2, nnodes=2, master_port=29500)


def test_a_killed_worker_fails_the_engine_fast_and_leaves_no_process(tmp_path):
    save_tiny_model(str(tmp_path), "llama")
    llm = LLM(str(tmp_path), kv_cache_memory="16MiB", tensor_parallel_size=2)
    ((_, worker),) = llm.engine.tp.processes
    outcome: dict = {}

    def generate() -> None:
        try:
            llm.generate([[5, 6, 7, i] for i in range(32)], SamplingParams(max_tokens=480, ignore_eos=True))
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            outcome["error"] = exc

    thread = threading.Thread(target=generate)
    thread.start()
    time.sleep(0.5)  # mid-generation (15,000 tokens to go)
    assert thread.is_alive()
    killed = time.monotonic()
    os.kill(worker.pid, signal.SIGKILL)
    thread.join(timeout=20)
    assert not thread.is_alive()
    assert time.monotonic() - killed < 10
    assert isinstance(outcome.get("error"), RankFailed)
    llm.close()
    assert worker.exitcode == -signal.SIGKILL


@pytest.fixture(scope="module")
def model_with_text(tmp_path_factory) -> str:
    """A tiny random model with the default model's tokenizer, so that a stream carries text."""
    from helpers import default_gguf

    from kvserve.tokenizer import Tokenizer

    folder = str(tmp_path_factory.mktemp("tiny-with-tokenizer"))
    save_tiny_model(folder, "llama", seed=7, vocab_size=49152)
    Tokenizer.load(default_gguf()).transformers_tokenizer().save_pretrained(folder)
    return folder


def _stream(server: ServerProcess) -> list:
    body = {"prompt": "The capital of France is", "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    answer = httpx.post(server.url + "/v1/completions", json=body | {"stream": True}, timeout=60)
    assert answer.status_code == 200
    lines = [line[6:] for line in answer.text.splitlines() if line.startswith("data: ")]
    return [line if line == "[DONE]" else json.loads(line)["choices"] for line in lines]


@pytest.fixture(scope="module")
def tp1_stream(model_with_text) -> list:
    server = ServerProcess(["--model", model_with_text, "--kv-cache-memory", "4MiB"]).start()
    try:
        stream = _stream(server)
    finally:
        assert server.stop() == 0
    assert len(stream) > 16
    return stream


def test_a_step_failing_on_rank_0_stops_the_group_for_good(tmp_path):
    """An exception in rank 0's forward after the plan went out leaves the workers inside the step's
    collectives: the group is broken for good (no later step may pair with their stale exchanges), the
    next generate fails at once, and close() kills the worker."""
    save_tiny_model(str(tmp_path), "llama")
    llm = LLM(str(tmp_path), kv_cache_memory="1MiB", tensor_parallel_size=2)
    ((_, worker),) = llm.engine.tp.processes
    norm = llm.engine.runner.model.norm

    def broken(*args, **kwargs):
        raise RuntimeError("injected")

    norm.add_forward = broken
    params = SamplingParams(max_tokens=4, temperature=0)
    with pytest.raises(RankFailed, match="injected"):
        llm.generate([[5, 6, 7]], params)
    del norm.add_forward
    start = time.monotonic()
    with pytest.raises(RankFailed, match="failed earlier"):
        llm.generate([[5, 6, 7]], params)
    assert time.monotonic() - start < 1
    llm.close()
    assert worker.exitcode is not None


def test_server_streams_the_same_with_tp2(model_with_text, tp1_stream):
    server = ServerProcess(["--model", model_with_text, "--kv-cache-memory", "4MiB", "--tensor-parallel-size", "2"])
    server.start()
    try:
        assert _stream(server) == tp1_stream
    finally:
        assert server.stop() == 0


def test_two_nodes_on_one_machine(model_with_text, tp1_stream):
    """--nnodes 2: node 1 runs rank 1 and only computes; node 0 (rank 0) serves."""
    port = free_port()
    common = ["--model", model_with_text, "--kv-cache-memory", "4MiB", "--tensor-parallel-size", "2"]
    common += ["--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(port), "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")]))}
    node1 = subprocess.Popen([sys.executable, "-m", "kvserve.cli", "serve", *common, "--node-rank", "1"], env=env)
    try:
        server = ServerProcess([*common, "--node-rank", "0"]).start()
        try:
            assert _stream(server) == tp1_stream
        finally:
            assert server.stop() == 0
        assert node1.wait(timeout=30) == 0  # rank 0's stop ends the other node's ranks
    finally:
        node1.kill()


def test_under_torchrun(model_with_text, tp1_stream):
    """torchrun starts both ranks (env://); rank 0 serves, rank 1 computes."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
    ]
    command += ["-m", "kvserve.cli", "serve", "--port", str(port), "--model", model_with_text]
    command += ["--kv-cache-memory", "4MiB", "--tensor-parallel-size", "2"]
    server = ServerProcess([], port=port, command=command).start()
    try:
        assert _stream(server) == tp1_stream
    finally:
        server.stop()
