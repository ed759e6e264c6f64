"""Soak: hostile traffic against a real `kvserve serve` for a given time, then checks that nothing was lost.

    python benchmarks/soak.py --duration 600 --concurrency 256                  # the issue's 10 minutes
    python benchmarks/soak.py --duration 600 --concurrency 256 --tiers-int8     # int8 KV + host/disk tiers
    python benchmarks/soak.py --duration 60 --concurrency 32 --json out.json    # what the test suite runs

The script starts the server on 127.0.0.1 (a KV budget of ~10% of what the clients ask for, so that
preemption and eviction run all the time) and `--concurrency` clients, each sending one request after
another, drawn at random:
- completions and chat, streamed or not, n from 1 to 3;
- prompts from 1 token to near max_model_len, a third of them behind one of a few shared prefixes;
- 10% of the clients leave at a random point (mid-stream, or before a non-streamed answer);
- 5% of the streams are read slowly (a pause after every chunk);
- every 30 s a burst of 16 requests more than the waiting queue has room for (clean 503s expected);
- the server runs with --max-queue-time under the clients' timeout: a request the overloaded server
  cannot start in time gets a clean 503 (queue_timeout, in-band when streamed), not a hang;
- a greedy "canary" request, repeated through the run: its text must never change.

Every request ends as exactly one of: completed (a whole answer: [DONE] after a finish reason, or a
200 JSON body with one), rejected (a 4xx/503 with an OpenAI error body), disconnected (the client's own
choice), or lost (anything else: a hang past --request-timeout, a broken or truncated stream, a 5xx).
At the end, on the idle server: KV blocks in use must be back to 0, and RSS is read before and after.
The exit status is 1 when a check fails (lost > 0, 5xx > 0, blocks leaked, RSS growth over
--max-rss-growth, the canary changed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

from kvserve.server.launch import ServerProcess

WORDS = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "words.txt")).read().split()
CANARY = {"prompt": "The three primary colors are", "max_tokens": 24, "temperature": 0}
BURST_EVERY_S = 30.0


@dataclass
class Outcome:
    kind: str  # completed, rejected, disconnected, lost
    status: int | None = None
    ttft_s: float | None = None
    detail: str = ""


@dataclass
class Report:
    configuration: str
    duration_s: float
    requests: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    server_errors: int = 0
    blocks_leaked: float = 0.0
    rejected_by_status: dict[str, int] = field(default_factory=dict)
    rss_loaded_mib: float = 0.0  # after the model loaded
    rss_start_mib: float = 0.0  # after the warm-up (the first 20% of the run): allocator pools filled
    rss_end_mib: float = 0.0
    ttft_p99_s: float | None = None
    preemptions: float = 0.0
    canary_texts: int = 0
    lost_examples: list[str] = field(default_factory=list)
    fuzz: str = "off"  # schemathesis alongside the load (--fuzz-examples): off, passed, or its failures
    fuzz_summary: str = ""  # schemathesis's own closing lines: test cases tried, per operation and in all

    @property
    def rss_growth(self) -> float:
        return self.rss_end_mib / self.rss_start_mib - 1 if self.rss_start_mib else 0.0

    def failures(self, max_rss_growth: float) -> list[str]:
        problems = []
        if self.outcomes.get("lost", 0):
            problems.append(f"{self.outcomes['lost']} requests lost: {self.lost_examples[:3]}")
        if self.server_errors:
            problems.append(f"{self.server_errors} responses were 5xx")
        if self.blocks_leaked:
            problems.append(f"{self.blocks_leaked:.0f} KV blocks still in use on the idle server")
        if self.rss_growth > max_rss_growth:
            problems.append(f"RSS grew {self.rss_growth:.1%} (limit {max_rss_growth:.0%})")
        if self.canary_texts > 1:
            problems.append(f"the greedy canary gave {self.canary_texts} different texts")
        if self.fuzz not in ("off", "passed"):
            problems.append(f"schemathesis found failures: {self.fuzz}")
        return problems


def metrics(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


class Soak:
    def __init__(self, url: str, args: argparse.Namespace, rng: random.Random) -> None:
        self.url, self.args, self.rng = url, args, rng
        self.outcomes: list[Outcome] = []
        self.canary_texts: set[str] = set()
        self.prefixes = [[rng.randrange(100, 30000) for _ in range(rng.randrange(32, 200))] for _ in range(4)]
        self.deadline = 0.0
        self.rss_warm: float | None = None
        self.fuzz_result = "off"
        self.fuzz_summary = ""
        self.pid = 0

    # ---- requests

    def body(self) -> tuple[str, dict]:
        rng, max_len = self.rng, self.args.max_model_len
        max_tokens = rng.randrange(1, 33)
        n = rng.choice([1, 1, 1, 2, 3])
        stream = rng.random() < 0.6
        if rng.random() < 0.3:  # chat: a few sentences of words
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(1, 60)))
            body = {"messages": [{"role": "user", "content": words}], "max_tokens": max_tokens}
            path = "/v1/chat/completions"
        else:  # completions: token ids from 1 to near max_model_len, a third behind a shared prefix
            length = int(rng.triangular(1, max_len - max_tokens - 1, 48))
            prefix = rng.choice(self.prefixes) if rng.random() < 0.33 else []
            prompt = (prefix + [rng.randrange(100, 30000) for _ in range(length)])[: max_len - max_tokens - 1]
            body = {"prompt": prompt or [100], "max_tokens": max_tokens}
            path = "/v1/completions"
        body.update(n=n, stream=stream, temperature=rng.choice([0, 0.7, 1.0]), ignore_eos=rng.random() < 0.5)
        return path, body

    async def send(
        self, client: httpx.AsyncClient, path: str, body: dict, leave_after: float | None, slow: bool
    ) -> Outcome:
        start = time.monotonic()
        if not body.get("stream"):
            try:
                request = client.post(path, json=body)
                r = await (asyncio.wait_for(request, leave_after) if leave_after is not None else request)
            except asyncio.TimeoutError:
                return Outcome("disconnected")
            except httpx.HTTPError as exc:
                return Outcome("lost", detail=f"{type(exc).__name__}: {exc!r}"[:160])
            return self.judge_json(r)
        ttft = None
        finished = done = False
        try:
            async with client.stream("POST", path, json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    return self.judge_json(r)
                chunks = 0
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        break
                    try:
                        payload = json.loads(line[len("data: ") :])
                    except ValueError:  # an event that is not one line of JSON: the stream is broken
                        return Outcome("lost", 200, ttft, f"unreadable event: {line[:120]!r}")
                    if "error" in payload:
                        if payload["error"].get("code") == "queue_timeout":  # waited past --max-queue-time
                            return Outcome("rejected", 503)
                        return Outcome("lost", 200, detail=f"in-band error: {payload['error']['message'][:120]}")
                    ttft = ttft if ttft is not None else time.monotonic() - start
                    finished = finished or any(c.get("finish_reason") for c in payload.get("choices", []))
                    chunks += 1
                    if leave_after is not None and chunks >= leave_after:
                        return Outcome("disconnected", ttft_s=ttft)
                    if slow:
                        await asyncio.sleep(0.05)
        except httpx.HTTPError as exc:
            return Outcome("lost", detail=f"{type(exc).__name__}: {exc!r}"[:160])
        if done and finished:
            return Outcome("completed", 200, ttft)
        return Outcome("lost", 200, ttft, f"stream ended without {'[DONE]' if finished else 'a finish reason'}")

    @staticmethod
    def judge_json(r: httpx.Response) -> Outcome:
        if r.status_code == 200:
            choices = r.json().get("choices") or []
            ok = choices and all(c.get("finish_reason") for c in choices)
            return Outcome("completed", 200) if ok else Outcome("lost", 200, detail="200 without finished choices")
        try:
            error = r.json()["error"]
            clean = bool(error["message"])
        except (ValueError, KeyError, TypeError):
            clean = False
        if r.status_code >= 500 and r.status_code != 503:
            return Outcome("lost", r.status_code, detail=r.text[:160])
        return Outcome("rejected", r.status_code) if clean else Outcome("lost", r.status_code, detail=r.text[:160])

    # ---- clients

    async def client(self, client: httpx.AsyncClient, index: int) -> None:
        rng = random.Random(self.rng.random())
        leaver = index % 10 == 0  # 10% of the clients leave early, at a random point
        while time.monotonic() < self.deadline:
            if rng.random() < 0.02:
                await self.canary(client)
                continue
            path, body = self.body()
            leave_after = None
            if leaver:
                leave_after = rng.randrange(1, 8) if body["stream"] else rng.uniform(0.05, 2.0)
            outcome = await self.timed(self.send(client, path, body, leave_after, slow=rng.random() < 0.05))
            self.outcomes.append(outcome)

    async def timed(self, work) -> Outcome:
        try:
            return await asyncio.wait_for(work, self.args.request_timeout)
        except asyncio.TimeoutError:
            return Outcome("lost", detail=f"no answer within {self.args.request_timeout} s")

    async def canary(self, client: httpx.AsyncClient) -> None:
        async def run() -> Outcome:
            r = await client.post("/v1/completions", json=CANARY)
            if r.status_code == 200:
                self.canary_texts.add(r.json()["choices"][0]["text"])
            return self.judge_json(r)

        self.outcomes.append(await self.timed(run()))

    async def bursts(self, client: httpx.AsyncClient) -> None:
        """Every BURST_EVERY_S: 16 requests more than the waiting queue has room for, all at once (so that
        the overflow must get clean 503s without the bursts alone keeping the queue full)."""
        while time.monotonic() + BURST_EVERY_S < self.deadline:
            await asyncio.sleep(BURST_EVERY_S)
            waiting = (await asyncio.to_thread(metrics, self.url))["kvserve:num_requests_waiting"]
            size = max(0, self.args.max_waiting_requests - int(waiting)) + 16
            bodies = [{"prompt": [100 + i, 200, 300], "max_tokens": 4} for i in range(size)]
            results = await asyncio.gather(
                *(self.timed(self.send(client, "/v1/completions", b, None, False)) for b in bodies)
            )
            self.outcomes.extend(results)

    async def warm_up(self) -> None:
        await asyncio.sleep(self.args.duration * 0.2)
        self.rss_warm = rss_mib(self.pid)

    async def fuzz(self) -> None:
        """schemathesis against /openapi.json while the load runs (the test suite's short run, longer, on a
        server under pressure): every check but positive_data_acceptance (see tests/test_fuzz.py) and
        not_a_server_error, which counts the load's clean 503s (queue_full, queue_timeout) as failures. A
        real server error still fails the run: every 500 the server gives comes from an exception that it
        logs with its traceback, and soak() fails on a traceback in the server's log."""
        command = [sys.executable, "-m", "schemathesis.cli", "run", self.url + "/openapi.json", "--checks", "all"]
        command += ["--exclude-checks", "positive_data_acceptance,not_a_server_error"]
        command += ["--max-examples", str(self.args.fuzz_examples)]
        command += ["--seed", str(self.args.seed), "--phases", "examples,coverage,fuzzing", "--workers", "2"]
        # A request of max_model_len output tokens, sent while the load keeps ~100 sequences running, legitimately
        # takes minutes (its queue time, then hundreds of steps at batch ~100): schemathesis waits for it, up to
        # 3x the clients' bound. A hang still fails: the soak's own clients, whose answers are short, bound it.
        timeout = str(3 * self.args.request_timeout)
        command += ["--request-timeout", timeout, "--max-response-time", timeout]  # (the check's default: 10 s)
        with tempfile.TemporaryDirectory(prefix="kvserve-fuzz-") as cwd:  # its .schemathesis/ cache goes there
            proc = await asyncio.create_subprocess_exec(
                *command, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
            )
            output, _ = await proc.communicate()
        text = output.decode(errors="replace")
        self.fuzz_result = "passed" if proc.returncode == 0 else text[-2000:]
        self.fuzz_summary = "\n".join(line for line in text.splitlines() if re.search(r"test cases|generated", line))

    async def run(self) -> None:
        self.deadline = time.monotonic() + self.args.duration
        # Idle connections are dropped after 2 s, before uvicorn's 5 s keep-alive timeout closes them from
        # its side: a request sent on a connection the server is closing at that instant fails with a
        # ReadError that no server can prevent (httpx does not retry a POST), which is not the server's loss.
        connections = self.args.concurrency + self.args.max_waiting_requests + 32
        limits = httpx.Limits(max_connections=connections, keepalive_expiry=2.0)
        timeout = httpx.Timeout(self.args.request_timeout)
        async with httpx.AsyncClient(base_url=self.url, limits=limits, timeout=timeout) as client:
            await self.canary(client)
            clients = (self.client(client, i) for i in range(self.args.concurrency))
            fuzz = [self.fuzz()] if self.args.fuzz_examples else []
            await asyncio.gather(self.warm_up(), self.bursts(client), *fuzz, *clients)


def server_args(args: argparse.Namespace, folder: str) -> list[str]:
    out = ["--max-model-len", str(args.max_model_len), "--kv-cache-memory", args.kv_cache_memory]
    out += ["--max-waiting-requests", str(args.max_waiting_requests), "--log-stats-interval", "10"]
    out += ["--max-queue-time", str(args.max_queue_time)]
    if args.tiers_int8:
        out += ["--kv-cache-dtype", "int8", "--kv-offload-memory", "64MiB"]
        out += ["--kv-offload-dir", folder, "--kv-offload-disk", "256MiB"]
    return out


def soak(args: argparse.Namespace) -> Report:
    configuration = "int8 KV + host/disk tiers" if args.tiers_int8 else "float KV, no tiers"
    with tempfile.TemporaryDirectory(prefix="kvserve-soak-") as folder:
        server = ServerProcess(server_args(args, folder)).start()
        try:
            rss_loaded = rss_mib(server.proc.pid)
            run = Soak(server.url, args, random.Random(args.seed))
            run.pid = server.proc.pid
            started = time.monotonic()
            asyncio.run(run.run())
            elapsed = time.monotonic() - started
            deadline = time.monotonic() + 60
            while (m := metrics(server.url))["kvserve:num_requests_running"] or m["kvserve:kv_blocks_used"]:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            rss_end = rss_mib(server.proc.pid)
        finally:
            code = server.stop()
        counts = Counter(o.kind for o in run.outcomes)
        ttfts = sorted(o.ttft_s for o in run.outcomes if o.ttft_s is not None)
        report = Report(
            configuration=configuration,
            duration_s=round(elapsed, 1),
            requests=len(run.outcomes),
            outcomes=dict(counts),
            server_errors=sum(1 for o in run.outcomes if o.status is not None and o.status >= 500 and o.status != 503),
            blocks_leaked=m["kvserve:kv_blocks_used"],
            rejected_by_status=dict(Counter(str(o.status) for o in run.outcomes if o.kind == "rejected")),
            rss_loaded_mib=round(rss_loaded, 1),
            rss_start_mib=round(run.rss_warm or rss_loaded, 1),
            rss_end_mib=round(rss_end, 1),
            ttft_p99_s=round(ttfts[int(0.99 * (len(ttfts) - 1))], 3) if ttfts else None,
            preemptions=m.get("kvserve:num_preemptions_total", 0.0),
            canary_texts=len(run.canary_texts),
            lost_examples=[o.detail for o in run.outcomes if o.kind == "lost"][:10],
            fuzz=run.fuzz_result,
            fuzz_summary=run.fuzz_summary,
        )
        if code != 0 or "Traceback" in server.output():
            report.lost_examples.append(f"server exit {code}; traceback in its log: {'Traceback' in server.output()}")
            report.server_errors += 1
        return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of traffic")
    parser.add_argument("--concurrency", type=int, default=256, help="clients sending at once")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--kv-cache-memory", default=None, help="default: ~10%% of the clients' demand")
    parser.add_argument("--max-waiting-requests", type=int, default=None, help="default: 2x concurrency")
    parser.add_argument("--tiers-int8", action="store_true", help="int8 KV and host + disk tiers")
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument(
        "--max-queue-time", type=float, default=150.0, help="the server's: a request never waits out the client"
    )
    parser.add_argument(
        "--fuzz-examples", type=int, default=0, help="run schemathesis with this many examples per operation alongside"
    )
    parser.add_argument("--max-rss-growth", type=float, default=0.10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args(argv)
    if args.kv_cache_memory is None:
        # demand: every client's prompt + output, ~max_model_len / 3 on average, at 46 KB a token (fp32 KV)
        demand = args.concurrency * args.max_model_len / 3 * 46080
        args.kv_cache_memory = f"{max(8, int(demand * 0.10 / 2**20))}MiB"
    if args.max_waiting_requests is None:
        args.max_waiting_requests = 2 * args.concurrency
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = soak(args)
    problems = report.failures(args.max_rss_growth)
    print(json.dumps(asdict(report), indent=2))
    print("OK" if not problems else "FAILED:\n  " + "\n  ".join(problems))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**asdict(report), "args": vars(args), "problems": problems}, f, indent=2)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
