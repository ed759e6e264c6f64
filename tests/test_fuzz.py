"""API fuzzing: schemathesis against the server's own /openapi.json (slow: ~1 minute).

The schema declares every request body as the pydantic model that validates it (server/openapi.py),
so what schemathesis generates is what clients may send. ~100 examples per operation, over the
examples, coverage and fuzzing phases, with every check but positive_data_acceptance (that every
schema-valid request succeeds): some rules span fields and are not JSON Schema (a prompt plus
max_tokens within max_model_len, exactly one structured-outputs constraint), so a schema-valid request
may rightly get a 400. No check may fail: no 5xx, no status, content type or header the schema does not
declare, no schema-violating request accepted, no method or missing key let through.
"""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from kvserve.server.launch import ServerProcess

pytestmark = pytest.mark.slow

KEY = "fuzz-key"


def test_schemathesis_finds_nothing(tmp_path):
    args = ["--api-key", KEY, "--max-model-len", "64", "--kv-cache-memory", "32MiB", "--tool-call-parser", "hermes"]
    server = ServerProcess([*args, "--served-model-name", "m"]).start()
    try:
        assert httpx.get(server.url + "/openapi.json").status_code == 401  # behind the key, like the API
        schema = httpx.get(server.url + "/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).json()
        completion = schema["components"]["schemas"]["CompletionRequest"]
        assert completion["additionalProperties"] is False and "max_tokens" in completion["properties"]
        command = [sys.executable, "-m", "schemathesis.cli", "run", server.url + "/openapi.json"]
        command += [
            "-H",
            f"Authorization: Bearer {KEY}",
            "--checks",
            "all",
            "--exclude-checks",
            "positive_data_acceptance",
        ]
        command += ["--max-examples", "100", "--seed", "1", "--phases", "examples,coverage,fuzzing", "--workers", "2"]
        # a time limit is no correctness check: a constrained answer of max_model_len tokens on a busy
        # 2-core machine took 14.6 s once, past schemathesis' default 10 s
        command += ["--request-timeout", "300", "--max-response-time", "300", "--report-dir", str(tmp_path)]
        # cwd: schemathesis keeps a .schemathesis/ cache in its working directory, not in the checkout
        run = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)
        assert run.returncode == 0, run.stdout[-6000:]
    finally:
        code = server.stop()
    output = server.output()
    assert code == 0 and "Traceback" not in output, output[-3000:]
