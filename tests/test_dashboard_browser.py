"""The dashboard in a real browser: headless Chromium (Debian's, driven by Playwright) opens /dashboard
on a live server under load, behind an API key (Basic auth, as a browser sends it).

Chromium comes from Debian's `chromium` package: `make test` installs it when it can (tests/install_browser.sh);
without it this test is skipped, and says why. The screenshot goes to benchmarks/out/dashboard.png.
"""

from __future__ import annotations

import os
import shutil
import threading

import httpx
import pytest

from kvserve.server.launch import ServerProcess

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
KEY = "dashboard-test-key"
SCREENSHOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "out")
SYSTEM = "You are a careful assistant. Answer briefly, in plain words, and name your sources when you can. "


def _load(url: str, stop: threading.Event, errors: list, first: int) -> None:
    """Streams completions one after another: prompts sharing a prefix, 48 tokens each."""
    i = first
    with httpx.Client(timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as client:
        while not stop.is_set():
            body = {"prompt": SYSTEM + f"Question {i}: why is the sky blue?", "max_tokens": 48, "ignore_eos": True}
            try:
                with client.stream("POST", url + "/v1/completions", json=body | {"stream": True}) as answer:
                    for _ in answer.iter_lines():
                        if stop.is_set():
                            break
            except httpx.HTTPError as exc:  # the server stopping at the end is fine; anything else is not
                if not stop.is_set():
                    errors.append(exc)
            i += 1


def _open_dashboard(p, url: str, **context):
    """Headless Chromium on url/dashboard: (browser, page, the console's errors and uncaught exceptions, as
    they come). `context`: Playwright's new_context options (credentials)."""
    browser = p.chromium.launch(
        executable_path=CHROMIUM,
        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
    )
    page = browser.new_context(viewport={"width": 1400, "height": 900}, **context).new_page()
    errors: list[str] = []
    page.on("console", lambda m: m.type == "error" and errors.append(m.text))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/dashboard")
    return browser, page, errors


def test_dashboard_renders_live_state_in_chromium():
    if CHROMIUM is None:
        pytest.skip("no Chromium: Debian's `chromium` package is not installed (tests/install_browser.sh)")
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    args = ["--kv-cache-memory", "24MiB", "--kv-cache-dtype", "float16", "--max-num-seqs", "6", "--api-key", KEY]
    server = ServerProcess(args).start()
    stop, load_errors = threading.Event(), []
    threads = [threading.Thread(target=_load, args=(server.url, stop, load_errors, 100 * n)) for n in range(4)]
    try:
        num_blocks = httpx.get(server.url + "/v1/kv/state", headers={"Authorization": f"Bearer {KEY}"}).json()
        num_blocks = num_blocks["pool"]["num_blocks"]
        for t in threads:
            t.start()
        with playwright.sync_playwright() as p:
            credentials = {"username": "kvserve", "password": KEY}
            browser, page, console_errors = _open_dashboard(p, server.url, http_credentials=credentials)
            page.wait_for_function("Number(document.getElementById('samples').dataset.samples) >= 1", timeout=30_000)
            assert page.get_attribute("#pool", "data-cells") == str(num_blocks)
            page.wait_for_function(
                "document.querySelectorAll('#requests tbody tr[data-state=running]').length > 0", timeout=30_000
            )
            rows = page.locator("#requests tbody tr[data-state=running]")
            assert rows.count() >= 1 and rows.first.locator("td").nth(1).inner_text() == "running"
            samples = int(page.get_attribute("#samples", "data-samples"))
            before = page.inner_text("#requests") + page.inner_text("#g-usage")
            page.wait_for_function(
                f"Number(document.getElementById('samples').dataset.samples) >= {samples + 2}", timeout=30_000
            )
            after = page.inner_text("#requests") + page.inner_text("#g-usage")
            assert after != before  # ages, computed tokens, outputs move between samples
            page.wait_for_function("document.querySelectorAll('#tree li').length > 0", timeout=30_000)
            os.makedirs(SCREENSHOT, exist_ok=True)
            page.screenshot(path=os.path.join(SCREENSHOT, "dashboard.png"), full_page=True)
            browser.close()
        assert console_errors == []
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        server.stop()
    assert load_errors == []


def test_the_routers_dashboard_switches_workers_in_chromium(tmp_path):
    """Behind the router the page lists the workers (from /workers) and follows the chosen one's state."""
    if CHROMIUM is None:
        pytest.skip("no Chromium: Debian's `chromium` package is not installed (tests/install_browser.sh)")
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    import sys

    from helpers import save_tiny_model

    from kvserve.server.launch import free_port

    save_tiny_model(str(tmp_path), "llama")
    block = 3 * 2 * 16 * 2 * 16 * 4
    workers = [
        ServerProcess(["--model", str(tmp_path), "--kv-cache-memory", str(blocks * block)]) for blocks in (24, 40)
    ]
    for w in workers:
        w.start()
    port = free_port()
    command = [sys.executable, "-m", "kvserve.cli", "router", "--port", str(port), "--policy", "round_robin"]
    command += ["--health-interval", "0.2", *(arg for w in workers for arg in ("--worker", w.url))]
    router = ServerProcess([], port=port, command=command).start()
    try:
        with playwright.sync_playwright() as p:
            browser, page, errors = _open_dashboard(p, router.url)
            page.wait_for_function("document.getElementById('pool').dataset.cells === '24'", timeout=30_000)
            assert page.locator("#worker option").count() == 2
            page.select_option("#worker", "1")
            page.wait_for_function("document.getElementById('pool').dataset.cells === '40'", timeout=30_000)
            browser.close()
        assert errors == []
    finally:
        for server in (router, *workers):
            server.stop()
