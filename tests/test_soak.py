"""A 60-second soak (benchmarks/soak.py) so that CI catches regressions in what the soak checks:
32 clients of mixed, hostile traffic against a real server with a KV budget of ~10% of their demand;
no request lost, no 5xx, no KV block leaked, RSS growth after warm-up under 10%, the greedy canary
unchanged. The 10-minute, 256-stream runs and their figures are in benchmarks/README.md."""

from __future__ import annotations

import os
import sys

import pytest

pytestmark = pytest.mark.slow

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))


def test_sixty_second_soak():
    import soak

    args = soak.parse_args(["--duration", "60", "--concurrency", "32", "--request-timeout", "240"])
    report = soak.soak(args)
    assert not report.failures(args.max_rss_growth), report
    assert report.outcomes.get("completed", 0) > 100 and report.outcomes.get("disconnected", 0) > 0
    assert report.outcomes.get("rejected", 0) > 0 and report.preemptions > 0  # the bursts and the budget bit
