"""kvserve: an LLM inference and serving engine built around the KV cache.

The public names are imported lazily, so `import kvserve.kv.block_pool` (or the CLI's
argument parsing) does not pay for loading torch models and tokenizers.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "kvserve.llm",
    "Engine": "kvserve.engine",
    "EngineConfig": "kvserve.config",
    "SamplingParams": "kvserve.sampling_params",
    "StructuredOutputsParams": "kvserve.sampling_params",
    "RequestOutput": "kvserve.outputs",
    "CompletionOutput": "kvserve.outputs",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kvserve' has no attribute {name!r}")
