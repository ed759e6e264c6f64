"""`kvserve router --worker URL [--worker URL ...]`: the router alone, in front of servers started elsewhere.

Scaling out: one router per cluster, workers named by URL (each a `kvserve serve` with
--kv-events-endpoint on an address the router can reach), KV events over TCP. The router holds no
KV itself and does little work per request (tokenizing the prompt, hashing its blocks), so one router
serves many workers; `kvserve serve --data-parallel-size N` (router/replicas.py) is the same router in
front of N local workers.
"""

from __future__ import annotations

import argparse
import logging
import signal

from kvserve.router.policies import DEFAULT_BALANCE_ABS, DEFAULT_OVERLAP_WEIGHT, POLICIES

logger = logging.getLogger("kvserve.router")


def add_router_args(parser: argparse.ArgumentParser) -> None:
    """The routing options, shared by `kvserve router` and `kvserve serve --data-parallel-size`."""
    parser.add_argument(
        "--policy", choices=POLICIES, default="cost", help="how a worker is chosen (default: cost, KV- and load-aware)"
    )
    parser.add_argument("--health-interval", type=float, default=1.0, help="seconds between worker health checks")
    parser.add_argument(
        "--balance-abs-threshold",
        type=int,
        default=DEFAULT_BALANCE_ABS,
        help="prefix/cost give way to load when the busiest worker has this many more requests than the idlest...",
    )
    parser.add_argument("--balance-rel-threshold", type=float, default=1.5, help="...and this many times as many")
    parser.add_argument(
        "--overlap-weight",
        type=float,
        default=DEFAULT_OVERLAP_WEIGHT,
        help="cost policy: what computing one prompt block costs, in blocks held by requests in flight",
    )


def routing_options_given(args: argparse.Namespace) -> list[str]:
    """The routing flags in `args` set to something other than their default: for `kvserve serve` without
    replicas, which has no router to give them to and refuses them by name."""
    parser = argparse.ArgumentParser()
    add_router_args(parser)
    defaults = vars(parser.parse_args([]))
    return ["--" + name.replace("_", "-") for name, value in defaults.items() if getattr(args, name) != value]


def add_router_parser(sub) -> None:
    router = sub.add_parser("router", help="KV-cache-aware router in front of kvserve servers")
    router.add_argument("--worker", action="append", required=True, help="a worker's URL (repeat for each)")
    router.add_argument("--host", default="127.0.0.1")
    router.add_argument("--port", type=int, default=8000)
    router.add_argument(
        "--model", default=None, help="the workers' model, for its tokenizer (default: the default model)"
    )
    router.add_argument("--api-key", default=None, help="the workers' API key, for the router's own calls to them")
    add_router_args(router)
    router.set_defaults(func=cmd_router)


def cmd_router(args: argparse.Namespace) -> int:
    return run_router(args, args.worker, args.model)


def load_tokenizer(model: str | None):
    """The model's tokenizer, without loading the model (the router needs token ids only)."""
    from kvserve.models.paths import resolve_model_path
    from kvserve.tokenizer import Tokenizer

    return Tokenizer.load(resolve_model_path(model))


def run_router(args: argparse.Namespace, urls: list[str], model: str | None) -> int:
    import uvicorn

    from kvserve.router.app import Router, RouterMetrics, create_router_app
    from kvserve.router.index import KVIndex
    from kvserve.router.policies import make_policy
    from kvserve.router.workers import WorkerPool

    index = KVIndex()
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    pool = WorkerPool(urls, index, interval=args.health_interval, headers=headers)
    policy = make_policy(
        args.policy,
        index,
        balance_abs=args.balance_abs_threshold,
        balance_rel=args.balance_rel_threshold,
        overlap_weight=args.overlap_weight,
    )
    tokenizer = load_tokenizer(model) if args.policy in ("prefix", "cost") else None
    router = Router(pool, policy, tokenizer, RouterMetrics(args.policy))
    app = create_router_app(router, args.api_key)
    logger.info("routing to %s with policy %s on http://%s:%d", ", ".join(urls), args.policy, args.host, args.port)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,  # open connections (a dashboard's stream) cannot hold a shutdown up
    )
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal it caught once it has shut down, through the handler installed before it
    # started: a no-op one, so that SIGTERM ends the router (and its replicas) with exit 0 (as server/app.py).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run()
    return 0 if server.started else 1
