"""What a router needs to know of this server's KV cache: GET /kv_cache and GET /kv_cache/blocks.

/kv_cache: the block size and the root of the prefix-hash chain (kv/prefix_hash.py), so that a router
computes the same block hashes as this engine from a prompt's token ids, and where the KV events are
published. /kv_cache/blocks: the hashes of every block each medium holds now, read on the engine
thread: what a router's index, built from the events, should match.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

from kvserve.async_engine import EngineDeadError
from kvserve.engine import Engine
from kvserve.kv.events import DEFAULT_TOPIC, MEDIUM_DEVICE
from kvserve.server.errors import APIError
from kvserve.server.serving import ServerState


def _info(engine: Engine) -> dict:
    events = engine.kv_events
    return {
        "block_size": engine.config.block_size,
        "num_blocks": engine.kv.pool.num_blocks,
        "prefix_caching": engine.kv.enable_prefix_caching,
        "root_hash": engine.kv.root_hash.hex(),
        "tiers": [t.name for t in engine.kv.offload.tiers] if engine.kv.offload is not None else [],
        "kv_events": None
        if events is None
        else {"endpoint": events.endpoint, "replay_endpoint": events.replay_endpoint, "topic": DEFAULT_TOPIC},
    }


def _blocks(engine: Engine) -> dict[str, list[str]]:
    """Engine thread: every cached block hash, per medium (the disk tier's index under its lock)."""
    out = {MEDIUM_DEVICE: [h.hex() for h in engine.kv.pool.cached]}
    for tier in engine.kv.offload.tiers if engine.kv.offload is not None else []:
        out[tier.name] = [h.hex() for h in tier.block_hashes()]
    return out


async def _inspect(state: ServerState, read) -> JSONResponse:
    try:
        return JSONResponse(await state.engine.inspect(read))
    except EngineDeadError as exc:
        raise APIError(503, str(exc), code="engine_unavailable") from None


async def kv_cache_info(state: ServerState) -> JSONResponse:
    return await _inspect(state, _info)


async def kv_cache_blocks(state: ServerState) -> JSONResponse:
    return await _inspect(state, _blocks)
