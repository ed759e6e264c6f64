"""The KV cache's live state (kv_state.py, GET /v1/kv/state): block states, eviction order, the prefix
tree and the request table, checked exactly on a tiny model after a known sequence of requests."""

from __future__ import annotations

import base64
import json

import httpx
import pytest
from helpers import TINY_LLAMA_BLOCK_BYTES as BLOCK_BYTES
from helpers import save_tiny_model

from kvserve import LLM, SamplingParams
from kvserve.server.launch import ServerProcess

ONE = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("tiny"))
    save_tiny_model(folder, "llama")
    return folder


def cells(state) -> list[tuple[int, int, int, float]]:
    return [tuple(c) for c in state["pool"]["cells"]]


def runs(node) -> list:
    """A tree as nested ((first block, last block, blocks), hits, children)."""
    blocks = (node["first_block"], node["last_block"], node["num_blocks"])
    return [blocks, node["hits"], [runs(c) for c in node["children"]]]


def test_pool_states_eviction_order_and_prefix_tree(tiny):
    llm = LLM(tiny, kv_cache_memory=8 * BLOCK_BYTES, max_model_len=128)
    a = list(range(10, 50))  # 40 tokens: blocks 0, 1 full and cached, block 2 partial
    b = a[:16] + list(range(100, 124))  # shares a's first block: a hit on block 0, then blocks 3, 4
    llm.generate([a], ONE)
    llm.generate([b], ONE)
    state = llm.engine.kv_state()
    pool = state["pool"]
    assert (pool["num_blocks"], pool["blocks_per_cell"], pool["in_use"], pool["cached"], pool["free"]) == (
        8,
        1,
        0,
        3,
        5,
    )
    # free queue (eviction order): 5 6 7 2 1 4 3 0; cached among them: 1, 3, 0 -> recency 0, 0.5, 1
    assert cells(state) == [
        (0, 1, 0, 1.0),
        (0, 1, 0, 0.0),
        (0, 0, 1, -1),
        (0, 1, 0, 0.5),
        (0, 0, 1, -1),
        (0, 0, 1, -1),
        (0, 0, 1, -1),
        (0, 0, 1, -1),
    ]
    tree = state["prefix_tree"]
    assert (tree["num_cached_blocks"], tree["num_trees"]) == (3, 1)
    assert [runs(r) for r in tree["roots"]] == [[(0, 0, 1), 1, [[(1, 1, 1), 0, []], [(3, 3, 1), 0, []]]]]
    assert tree["roots"][0]["text"] == " ".join(map(str, a[:8]))  # no tokenizer: the ids
    assert state["requests"] == [] and pool["owners"] == {}

    # 81 tokens need 6 blocks: taken from the queue's head (5 6 7 2 1 4), evicting the cached block 1
    c = list(range(200, 280))
    llm.generate([c], ONE)
    state = llm.engine.kv_state()
    assert llm.engine.kv.pool.num_evictions == 1
    tree = state["prefix_tree"]
    assert (tree["num_cached_blocks"], tree["num_trees"]) == (7, 2)
    # c's five full blocks are one run (5 6 7 2 1); a's first block and b's second now form a chain: one run
    assert [runs(r) for r in tree["roots"]] == [[(5, 1, 5), 0, []], [(0, 3, 2), 1, []]]
    assert [r["blocks_under"] for r in tree["roots"]] == [5, 2]
    # only the largest tree when asked for one
    assert [runs(r) for r in llm.engine.kv_state(tree_roots=1)["prefix_tree"]["roots"]] == [[(5, 1, 5), 0, []]]
    assert [r["tokens"] for r in tree["roots"]] == [80, 32]


def test_the_tree_budget_is_shared_breadth_first(tiny, monkeypatch):
    """Past TREE_NODES nodes, every shown tree's top levels come first and what is left out is counted."""
    import kvserve.kv_state

    llm = LLM(tiny, kv_cache_memory=32 * BLOCK_BYTES, max_model_len=128)
    shared = list(range(10, 26))
    llm.generate([shared + list(range(100 + 20 * i, 117 + 20 * i)) for i in range(5)], ONE)  # 1 root, 5 branches
    llm.generate([list(range(200, 233))], ONE)  # a second tree: 2 blocks in one run
    monkeypatch.setattr(kvserve.kv_state, "TREE_NODES", 4)
    roots = llm.engine.kv_state()["prefix_tree"]["roots"]
    assert [(r["num_blocks"], r["blocks_under"], len(r["children"]), r["children_cut"]) for r in roots] == [
        (1, 6, 2, 3),  # both roots shown, then 2 of the first root's 5 children: 4 nodes
        (2, 2, 0, 0),
    ]


def test_running_and_preempted_requests_and_binned_cells(tiny):
    """Two requests that outgrow an 8-block pool: the newest is preempted; the table shows it waiting with
    no blocks, the running one with its blocks, and the in-use cells are exactly its blocks."""
    llm = LLM(tiny, kv_cache_memory=8 * BLOCK_BYTES, max_model_len=128, enable_prefix_caching=False)
    engine = llm.engine
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    first = engine.add_request(list(range(10, 50)), params)
    second = engine.add_request(list(range(60, 100)), params)
    while engine.scheduler.num_preemptions == 0:
        engine.step()
    state = engine.kv_state()
    rows = {r["id"]: r for r in state["requests"]}
    running = engine.scheduler.running[0]
    assert [r["state"] for r in state["requests"]] == ["running", "preempted"]
    assert rows[first]["state"] == "running" and rows[second]["state"] == "preempted"
    assert rows[second]["blocks"] == 0 and rows[second]["preemptions"] == 1
    held = engine.kv.block_ids(running)
    assert rows[first]["blocks"] == len(held) and rows[first]["computed_tokens"] == running.num_computed_tokens
    assert [i for i, c in enumerate(cells(state)) if c[0]] == sorted(held)
    assert state["pool"]["owners"] == {str(b): [first] for b in sorted(held)} and state["pool"]["owner_counts"] == {}
    assert state["gauges"]["running"] == 1 and state["gauges"]["waiting"] == 1
    # binned: 8 blocks in cells of 2 (max_cells 4 -> 4 cells), counts summed per cell
    binned = engine.kv_state(max_cells=4)["pool"]
    assert binned["blocks_per_cell"] == 2 and len(binned["cells"]) == 4
    assert [c[0] for c in binned["cells"]] == [sum(b // 2 == i for b in held) for i in range(4)]
    while engine.has_unfinished():
        engine.step()
    engine.check_idle()


def test_gauges_count_hits_preemptions_and_the_step_split(tiny):
    llm = LLM(tiny, kv_cache_memory=32 * BLOCK_BYTES, max_model_len=128)
    engine = llm.engine
    engine.kv_state()  # the first sample: rates are over the builds since
    prompt = list(range(10, 74))  # 4 blocks: 3 of them hit the second time (one token short of the end)
    llm.generate([prompt], ONE)
    llm.generate([prompt], ONE)
    gauges = engine.kv_state()["gauges"]
    assert gauges["hit_rate_1m"] == pytest.approx(48 / 128)  # queries: 64 + 64 prompt tokens, hits 48
    assert gauges["steps_1m"] == engine.stats.num_steps
    assert all(gauges["step_ms"][part] > 0 for part in ("schedule", "forward", "sample"))
    assert gauges["preemptions_per_min"] == 0


def _basic(key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"user:{key}".encode()).decode()}


def test_server_routes_auth_stream_and_no_dashboard(tiny):
    server = ServerProcess(["--model", tiny, "--kv-cache-memory", str(8 * BLOCK_BYTES), "--api-key", "sesame"]).start()
    try:
        url = server.url
        refused = httpx.get(url + "/v1/kv/state")
        assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Basic")
        assert httpx.get(url + "/dashboard", headers=_basic("wrong")).status_code == 401
        page = httpx.get(url + "/dashboard", headers=_basic("sesame"))
        assert page.status_code == 200 and "EventSource" in page.text and "<canvas" in page.text
        body = {"prompt": list(range(10, 50)), "max_tokens": 1}
        assert httpx.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer sesame"}).is_success
        state = httpx.get(url + "/v1/kv/state", headers={"Authorization": "Bearer sesame"}).json()
        assert state["pool"]["num_blocks"] == 8 and state["pool"]["cached"] == 2
        with httpx.stream(
            "GET", url + "/v1/kv/state?stream=true&interval=0.25", headers=_basic("sesame"), timeout=30
        ) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            events = []
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
                if len(events) == 2:
                    break
        assert events[1]["time"] > events[0]["time"] and events[1]["pool"]["cached"] == 2
        assert httpx.get(url + "/v1/kv/state?interval=0.01", headers=_basic("sesame")).status_code == 400
    finally:
        assert server.stop() == 0
    quiet = ServerProcess(["--model", tiny, "--kv-cache-memory", str(8 * BLOCK_BYTES), "--no-dashboard"]).start()
    try:
        assert httpx.get(quiet.url + "/dashboard").status_code == 404
        assert httpx.get(quiet.url + "/v1/kv/state").status_code == 404
    finally:
        assert quiet.stop() == 0


def test_kvserve_top_once(tiny):
    """`kvserve top --once` prints the gauges, the pool strip and the request table from a live server."""
    import subprocess
    import sys

    from kvserve.server.launch import _SRC

    server = ServerProcess(["--model", tiny, "--kv-cache-memory", str(8 * BLOCK_BYTES), "--api-key", "k"]).start()
    try:
        body = {"prompt": list(range(10, 50)), "max_tokens": 1}
        assert httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": "Bearer k"}).is_success
        env = {"PYTHONPATH": _SRC, "PATH": "/usr/bin:/bin", "COLUMNS": "100", "KVSERVE_API_KEY": "k"}
        out = subprocess.run(
            [sys.executable, "-m", "kvserve.cli", "top", "--url", server.url, "--once"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=True,
        ).stdout
    finally:
        server.stop()
    assert "KV in use" in out and "8 blocks x 16 tokens: 0 in use, 2 cached, 6 free" in out
    assert "2 cached blocks in 1 trees" in out and '"10 11 12 13 14 15 16 17"  2 blk · 0 hits' in out
    assert out.count("▓") == 2 and out.count("·") >= 6


def test_an_open_dashboard_does_not_hold_up_a_shutdown(tiny):
    """SIGTERM drains in-flight requests for up to --shutdown-timeout; a viewer's stream never ends by itself,
    so it ends when the drain begins and the server exits at once."""
    import threading
    import time

    server = ServerProcess(["--model", tiny, "--kv-cache-memory", str(8 * BLOCK_BYTES), "--shutdown-timeout", "60"])
    server.start()
    seen = []

    def view() -> None:
        with httpx.stream("GET", server.url + "/v1/kv/state?stream=true&interval=0.25", timeout=90) as stream:
            for line in stream.iter_lines():
                seen.append(line)

    viewer = threading.Thread(target=view)
    viewer.start()
    deadline = time.monotonic() + 30
    while not any(line.startswith("data: ") for line in seen) and time.monotonic() < deadline:
        time.sleep(0.1)
    start = time.monotonic()
    assert server.stop() == 0
    assert time.monotonic() - start < 15
    viewer.join(timeout=10)
    assert not viewer.is_alive()
