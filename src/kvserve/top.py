"""`kvserve top`: the dashboard's state (GET /v1/kv/state) in a terminal, for people on SSH.

It follows the server's stream (`?stream=true`) and redraws with rich's Live display: the gauges, the
block pool as a strip of cells (one character per cell: in use, cached, free), the tiers, the largest
prefix trees and the request table. `--once` prints one state and exits.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import httpx
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

MAX_REQUEST_ROWS = 20
MAX_TREE_ROOTS = 5


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def gauges(state: dict) -> Table:
    g = state["gauges"]
    step = g["step_ms"]
    table = Table.grid(padding=(0, 3))
    row = [
        ("KV in use", _pct(g["kv_usage"])),
        ("hit rate 1m", _pct(g["hit_rate_1m"])),
        ("preempt/min", _num(g["preemptions_per_min"])),
        ("running/waiting", f"{g['running']}/{g['waiting']}"),
        ("step ms sched/fwd/sample", f"{_num(step['schedule'])}/{_num(step['forward'])}/{_num(step['sample'])}"),
        ("out tok/s", _num(g["tokens_per_s"])),
    ]
    for _ in row:
        table.add_column()
    table.add_row(*(Text(label, style="dim") for label, _ in row))
    table.add_row(*(Text(value, style="bold") for _, value in row))
    return table


def pool_strip(state: dict, width: int) -> Text:
    """One character per cell, wrapped at `width`: in use (blue), cached (green, dim when next to go), free."""
    pool = state["pool"]
    text = Text()
    for i, (used, cached, free, recency) in enumerate(pool["cells"]):
        if i and i % width == 0:
            text.append("\n")
        if used >= max(cached, free):
            text.append("█", style="blue")
        elif cached >= free:
            text.append("▓", style="green" if recency >= 0.5 else "dark_green")
        else:
            text.append("·", style="grey35")
    per = pool["blocks_per_cell"]
    legend = f"\n{pool['num_blocks']} blocks x {pool['block_size']} tokens" + (f", {per} a cell" if per > 1 else "")
    legend += f": {pool['in_use']} in use, {pool['cached']} cached, {pool['free']} free"
    tiers = " · ".join(f"{t['name']} {t['blocks']}/{t['capacity_blocks']} blocks" for t in state["tiers"])
    text.append(legend + (f" · {tiers}" if tiers else ""), style="dim")
    return text


def prefix_forest(state: dict) -> Tree:
    tree = state["prefix_tree"]
    forest = Tree(f"{tree['num_cached_blocks']} cached blocks in {tree['num_trees']} trees", guide_style="dim")

    def add(parent: Tree, node: dict) -> None:
        label = Text(json.dumps(node["text"]), style="blue" if node["in_use"] else "")
        cut = f" · {node['children_cut']} more" if node["children_cut"] else ""
        label.append(f"  {node['num_blocks']} blk · {node['hits']} hits · {node['blocks_under']} under{cut}", "dim")
        branch = parent.add(label)
        for child in node["children"]:
            add(branch, child)

    for root in tree["roots"][:MAX_TREE_ROOTS]:
        add(forest, root)
    return forest


def requests(state: dict) -> Table:
    table = Table(box=None, header_style="dim", pad_edge=False)
    for name in ("request", "state", "prompt", "computed", "cached", "output", "blocks", "age s", "TTFT s"):
        table.add_column(name, justify="left" if name in ("request", "state") else "right")
    styles = {"running": "blue", "waiting": "dim", "preempted": "yellow"}
    for r in state["requests"][:MAX_REQUEST_ROWS]:
        table.add_row(
            Text(r["id"][-24:]),  # Text: an id is not rich markup
            Text(r["state"], style=styles.get(r["state"], "")),
            str(r["prompt_tokens"]),
            str(r["computed_tokens"]),
            str(r["cached_tokens"]),
            str(r["output_tokens"]),
            str(r["blocks"]),
            _num(r["age_s"]),
            _num(r["ttft_s"], 2),
        )
    more = len(state["requests"]) - MAX_REQUEST_ROWS
    if more > 0:
        table.caption = f"{more} more"
    return table


def render(state: dict, width: int) -> Group:
    title = Text(f"kvserve top · {state.get('model_name') or state['model']}")
    return Group(
        Panel(gauges(state), title=title, title_align="left"),
        Panel(pool_strip(state, max(16, width - 4)), title="block pool", title_align="left"),
        Panel(prefix_forest(state), title="prefix tree", title_align="left"),
        Panel(requests(state), title="requests", title_align="left"),
    )


def run_top(args: argparse.Namespace) -> int:
    """0 when the stream ends (or --once printed), 1 with a message for an error: the server's answer, an
    in-band error event, a connection that fails."""
    if args.interval < 0.25:
        raise ValueError(
            "--interval must be at least 0.25 seconds (the server builds the state at most 4 times a second)"
        )
    key = args.api_key or os.environ.get("KVSERVE_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    url = args.url.rstrip("/") + "/v1/kv/state"
    console = Console()
    columns, lines = shutil.get_terminal_size((100, 40))
    # the pool strip gets about a quarter of the screen: at most that many cells (larger pools are binned)
    params = {"cells": min(65536, max(16, (columns - 4) * max(2, lines // 4)))}
    try:
        with httpx.Client(headers=headers, timeout=httpx.Timeout(30, read=None)) as client:
            if args.once:
                answer = client.get(url, params=params)
                if answer.status_code != 200:
                    return _fail(console, f"{url}: HTTP {answer.status_code}: {answer.text[:300]}")
                console.print(render(answer.json(), columns))
                return 0
            params |= {"stream": "true", "interval": args.interval}
            with Live(console=console, auto_refresh=False, screen=False) as live:
                with client.stream("GET", url, params=params) as stream:
                    if stream.status_code != 200:
                        return _fail(console, f"{url}: HTTP {stream.status_code}: {stream.read()[:300]!r}")
                    event = "message"
                    for line in stream.iter_lines():
                        if line.startswith("event: "):
                            event = line[7:].strip()
                        elif line.startswith("data: "):
                            data = json.loads(line[6:]) if line[6:].startswith("{") else None
                            if event != "message" or not isinstance(data, dict) or "pool" not in data:
                                return _fail(console, f"the server ended the stream: {line[6:][:300]}")
                            live.update(render(data, console.width), refresh=True)
                        elif not line:
                            event = "message"
    except httpx.HTTPError as exc:
        return _fail(console, f"{url}: {exc}")
    except KeyboardInterrupt:
        return 0
    console.print("the server ended the stream")
    return 0


def _fail(console: Console, message: str) -> int:
    console.print(Text(f"kvserve top: {message}", style="red"))
    return 1
