"""Weight loading: Hugging Face folders (safetensors) and GGUF files, into HF-named tensors.

Both paths yield (ModelConfig, {hf_name: tensor}); model classes then take HF
names, so one `load_weights` per architecture serves both sources. Pickle
checkpoints (`*.bin`, `*.pt`) are refused: unpickling runs arbitrary code.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from collections.abc import Iterator

import numpy as np
import torch

from kvserve.models.gguf_metadata import GGUFHeader, read_gguf_header, read_gguf_metadata
from kvserve.models.model_config import ModelConfig
from kvserve.models.quantized import GGUF_QUANTIZED, QuantizedWeight, from_gguf

logger = logging.getLogger(__name__)


def is_gguf(path: str) -> bool:
    return os.path.isfile(path) and path.endswith(".gguf")


def load_model_config(path: str) -> ModelConfig:
    if is_gguf(path):
        return ModelConfig.from_gguf_metadata(read_gguf_metadata(path))
    if os.path.isdir(path):
        return ModelConfig.from_folder(path)
    raise ValueError(f"{path!r} is neither a .gguf file nor a Hugging Face model folder")


def load_weights(
    path: str, keep_quantized: bool = False
) -> tuple[ModelConfig, Iterator[tuple[str, torch.Tensor | QuantizedWeight]]]:
    """Returns the config and an iterator of (HF name, tensor) on the CPU: float tensors, except a
    GGUF's quantized matrices with keep_quantized, which come as QuantizedWeight (models/quantized.py)."""
    if is_gguf(path):
        return _load_gguf(path, keep_quantized)
    if os.path.isdir(path):
        return ModelConfig.from_folder(path), _iter_safetensors(path)
    raise ValueError(f"{path!r} is neither a .gguf file nor a Hugging Face model folder")


# ---------------------------------------------------------------- safetensors


def _iter_safetensors(folder: str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(folder, name) for name in files]
    else:
        files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        pickled = glob.glob(os.path.join(folder, "*.bin")) + glob.glob(os.path.join(folder, "*.pt"))
        if pickled:
            raise ValueError(
                f"{folder} holds only pickle checkpoints ({os.path.basename(pickled[0])}); kvserve never unpickles "
                "weights (it can run arbitrary code). Convert them to safetensors first."
            )
        raise ValueError(f"{folder} has no *.safetensors weights")
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


# ---------------------------------------------------------------- GGUF


_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_SUPPORTED = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q5_1", "Q8_K"}


def _load_gguf(
    path: str, keep_quantized: bool
) -> tuple[ModelConfig, Iterator[tuple[str, torch.Tensor | QuantizedWeight]]]:
    header = read_gguf_header(path)
    config = ModelConfig.from_gguf_metadata(header.meta)
    config.tie_word_embeddings = all(t.name != "output.weight" for t in header.tensors)
    # llama.cpp's converter permutes Q/K rows of llama-arch models so that its rope kernel
    # can rotate adjacent pairs; undo it to get HF's rotate-half layout back.
    permuted = header.meta["general.architecture"] == "llama"
    return config, _iter_gguf(path, header, config, permuted, keep_quantized)


def _iter_gguf(
    path: str, header: GGUFHeader, config: ModelConfig, permuted: bool, keep_quantized: bool
) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
    # Read tensor by tensor, not through a memory map: a mapped file's pages count in the process's RSS
    # (its peak) for as long as the map lives, which would add the whole file to the loading peak.
    with open(path, "rb") as file:
        yield from _read_gguf_tensors(file, header, config, permuted, keep_quantized)


def _read_gguf_tensors(file, header: GGUFHeader, config: ModelConfig, permuted: bool, keep_quantized: bool):
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    for info in header.tensors:
        hf_name = _gguf_to_hf_name(info.name)
        if hf_name is None:
            logger.debug("skipping GGUF tensor %s", info.name)
            continue
        kind = GGMLQuantizationType(info.ggml_type)
        if kind.name not in _GGUF_SUPPORTED:
            raise ValueError(f"GGUF tensor {info.name} has unsupported type {kind.name}")
        block_elems, block_bytes = GGML_QUANT_SIZES[kind]
        row_elems = info.dims[0]
        num_rows = int(np.prod(info.dims[1:], dtype=np.int64)) if len(info.dims) > 1 else 1
        row_bytes = row_elems // block_elems * block_bytes
        file.seek(info.offset)
        raw = np.fromfile(file, dtype=np.uint8, count=num_rows * row_bytes).reshape(num_rows, row_bytes)
        if keep_quantized and kind.name in GGUF_QUANTIZED and len(info.dims) == 2:
            weight = from_gguf(raw, kind.name, num_rows, row_elems)  # [rows, row_elems] = HF's [out, in]
        else:
            array = dequantize(raw, kind)  # [rows, row_elems] = HF's [out, in]
            shape = tuple(reversed(info.dims))
            weight = torch.from_numpy(np.array(array, dtype=np.float32).reshape(shape))  # a writable copy
        if permuted and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            weight = _unpermute_rope_rows(weight, config.num_heads)
        elif permuted and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            weight = _unpermute_rope_rows(weight, config.num_kv_heads)
        yield hf_name, weight


def _gguf_to_hf_name(name: str) -> str | None:
    if name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[name]
    if name.startswith("blk."):
        _, layer, rest = name.split(".", 2)
        if rest in _GGUF_LAYER_NAMES:
            return f"model.layers.{layer}.{_GGUF_LAYER_NAMES[rest]}"
    return None


def _unpermute_rope_rows(weight: torch.Tensor | QuantizedWeight, num_heads: int) -> torch.Tensor | QuantizedWeight:
    # converter: rows of each head reordered from [half0 | half1] to interleaved pairs;
    # w.reshape(heads, 2, d/2, ...).swapaxes(1, 2). The inverse swaps back.
    rows = weight.shape[0]
    order = torch.arange(rows).reshape(num_heads, rows // num_heads // 2, 2).transpose(1, 2).reshape(rows)
    if isinstance(weight, QuantizedWeight):
        return weight.select_rows(order)
    return weight[order].contiguous()
