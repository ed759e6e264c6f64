"""kvserve serve | generate | chat | bench | kv-plan | router | top.

Engine flags are generated from EngineConfig's fields (max_num_seqs -> --max-num-seqs),
so the CLI, the Python keywords and the server share one set of names.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
import typing

from kvserve.bench import add_bench_parser
from kvserve.config import HELP, EngineConfig
from kvserve.kv_plan import add_kv_plan_parser
from kvserve.router.main import add_router_args, add_router_parser, routing_options_given


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    hints = typing.get_type_hints(EngineConfig)
    for f in dataclasses.fields(EngineConfig):
        if f.name not in EngineConfig.option_names():
            continue
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        if hint is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=HELP.get(f.name))
            continue
        kind = str
        if hint in (int, int | None):
            kind = int
        elif hint in (float, float | None):
            kind = float
        group.add_argument(flag, type=kind, default=f.default, help=HELP.get(f.name))


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(**{name: getattr(args, name) for name in EngineConfig.option_names()})


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=256)
    group.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    group.add_argument("--top-p", type=float, default=1.0)
    group.add_argument("--top-k", type=int, default=0)
    group.add_argument("--min-p", type=float, default=0.0)
    group.add_argument("--repetition-penalty", type=float, default=1.0)
    group.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def sampling_params_from_args(args: argparse.Namespace):
    from kvserve.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        # no per-request seed: --seed seeds the engine, which makes a CLI run reproducible
        stop=args.stop,
    )


def stream_generation(engine, prompt, params, out=sys.stdout) -> str:
    """Runs one request to completion, writing text to `out` as it arrives; returns the text."""
    request_id = engine.add_request(prompt, params)
    text = []
    try:
        while not engine.is_finished(request_id):
            for delta in engine.step():
                if delta.request_id == request_id and delta.text:
                    out.write(delta.text)
                    out.flush()
                    text.append(delta.text)
    finally:
        if request_id in engine.groups:
            if engine.is_finished(request_id):
                engine.pop_finished(request_id)
            else:
                engine.abort(request_id)
    return "".join(text)


def cmd_generate(args: argparse.Namespace) -> int:
    from kvserve.engine import Engine

    engine = Engine(engine_config_from_args(args))
    params = sampling_params_from_args(args)
    prompt = args.prompt
    if engine.tokenizer is None:
        print("this model has no tokenizer: use the Python API with token ids", file=sys.stderr)
        return 2
    if not args.raw and engine.tokenizer.has_chat_template:
        prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    start = time.perf_counter()
    text = stream_generation(engine, prompt, params)
    print()
    if args.verbose:
        n = len(engine.tokenizer.encode(text, add_special_tokens=False))
        print(f"[{n} tokens in {time.perf_counter() - start:.2f}s]", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from kvserve.engine import Engine

    engine = Engine(engine_config_from_args(args))
    if engine.tokenizer is None or not engine.tokenizer.has_chat_template:
        print("this model has no chat template", file=sys.stderr)
        return 2
    params = sampling_params_from_args(args)
    history: list[dict] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    print("kvserve chat: type a message; /reset clears the history, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        prompt = engine.tokenizer.apply_chat_template(history)
        try:
            reply = stream_generation(engine, prompt, params)
        except KeyboardInterrupt:
            reply = ""
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            history.pop()
            continue
        print()
        history.append({"role": "assistant", "content": reply})


def cmd_serve(args: argparse.Namespace) -> int:
    if args.data_parallel_size < 1:
        raise ValueError(f"--data-parallel-size must be at least 1, got {args.data_parallel_size}")
    if args.data_parallel_size == 1 and (unused := routing_options_given(args)):
        raise ValueError(f"{', '.join(unused)}: routing options, for --data-parallel-size 2 or more")
    if args.data_parallel_size > 1:
        from kvserve.router.replicas import run_replicas

        return run_replicas(args)
    config = engine_config_from_args(args)
    if config.tensor_parallel_size > 1:
        from kvserve.distributed.workers import is_worker_node, run_node_workers

        if is_worker_node(config):  # another node's ranks, or a torchrun rank other than 0: compute only
            return run_node_workers(config)
    from kvserve.server.app import run_server

    return run_server(args, config)


def cmd_top(args: argparse.Namespace) -> int:
    from kvserve.top import run_top  # rich is imported by this command only, not by the server

    return run_top(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvserve", description="LLM inference and serving built around the KV cache")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete one prompt, streaming to the terminal")
    gen.add_argument("prompt")
    gen.add_argument("--raw", action="store_true", help="do not apply the chat template")
    gen.add_argument("--verbose", action="store_true")
    add_engine_args(gen)
    add_sampling_args(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat in the terminal")
    chat.add_argument("--system", default=None, help="system prompt")
    add_engine_args(chat)
    add_sampling_args(chat)
    chat.set_defaults(func=cmd_chat)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set KVSERVE_API_KEY)")
    serve.add_argument("--served-model-name", default=None)
    serve.add_argument("--max-request-bytes", type=int, default=4 * 1024 * 1024)
    serve.add_argument(
        "--tool-call-parser",
        choices=["hermes", "llama3_json"],  # server/tools.py's PARSERS (not imported here: it pulls in FastAPI)
        default=None,
        help='how tool_choice "auto" finds tool calls in the model\'s text (without it, "auto" is refused)',
    )
    serve.add_argument(
        "--shutdown-timeout", type=float, default=30.0, help="seconds in-flight requests get after SIGTERM"
    )
    serve.add_argument(
        "--dashboard",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="GET /dashboard (a live view of the KV cache) and GET /v1/kv/state; --no-dashboard turns both off",
    )
    serve.add_argument(
        "--data-parallel-size",
        type=int,
        default=1,
        help="N > 1: N engine processes (each its own KV cache, the threads split between them) behind the "
        "KV-cache-aware router on --port",
    )
    add_router_args(serve)
    add_engine_args(serve)
    serve.set_defaults(func=cmd_serve)

    add_router_parser(sub)
    add_bench_parser(sub)
    add_kv_plan_parser(sub)
    top = sub.add_parser("top", help="the KV cache's live state in the terminal (a server's /v1/kv/state)")
    top.add_argument("--url", default="http://127.0.0.1:8000", help="the kvserve server")
    top.add_argument("--api-key", default=None, help="the server's --api-key (or set KVSERVE_API_KEY)")
    top.add_argument("--interval", type=float, default=0.5, help="seconds between updates")
    top.add_argument("--once", action="store_true", help="print one state and exit")
    top.set_defaults(func=cmd_top)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args) or 0
    except ValueError as e:
        print(f"kvserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
