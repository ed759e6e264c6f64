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
        label.append(f"  {len(node['block_ids'])} blk · {node['hits']} hits · {node['blocks_under']} under", "dim")
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
            r["id"][-24:],
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
    title = f"kvserve top · {state.get('model_name') or state['model']}"
    return Group(
        Panel(gauges(state), title=title, title_align="left"),
        Panel(pool_strip(state, max(16, width - 4)), title="block pool", title_align="left"),
        Panel(prefix_forest(state), title="prefix tree", title_align="left"),
        Panel(requests(state), title="requests", title_align="left"),
    )


def run_top(args: argparse.Namespace) -> int:
    key = args.api_key or os.environ.get("KVSERVE_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    url = args.url.rstrip("/") + "/v1/kv/state"
    console = Console()
    width = shutil.get_terminal_size((100, 40)).columns
    with httpx.Client(headers=headers, timeout=httpx.Timeout(30, read=None)) as client:
        if args.once:
            answer = client.get(url)
            answer.raise_for_status()
            console.print(render(answer.json(), width))
            return 0
        with Live(console=console, auto_refresh=False, screen=False) as live:
            with client.stream("GET", url, params={"stream": "true", "interval": args.interval}) as stream:
                stream.raise_for_status()
                for line in stream.iter_lines():
                    if line.startswith("data: "):
                        live.update(render(json.loads(line[6:]), console.width), refresh=True)
    return 0
