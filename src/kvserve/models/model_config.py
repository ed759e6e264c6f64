"""ModelConfig: the architecture numbers the engine needs, from a HF config.json or GGUF metadata.

One dataclass for every supported architecture; fields that an architecture does
not use keep their defaults. The raw HF config dict is kept for model code that
needs rarer fields (e.g. rope scaling details).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

# HF `architectures` entries (or model_type) -> kvserve model family.
LLAMA_ARCHITECTURES = {
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
}
DEEPSEEK_ARCHITECTURES = {"DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"}


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: q/k/v have biases
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: set[int] = field(default_factory=set)
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def is_mla(self) -> bool:
        return self.architecture in DEEPSEEK_ARCHITECTURES

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        try:
            return cls._from_hf_dict(cfg)
        except KeyError as e:
            raise ValueError(f"config.json lacks the field {e.args[0]!r}") from None

    @classmethod
    def _from_hf_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        architectures = cfg.get("architectures") or []
        architecture = architectures[0] if architectures else _arch_from_model_type(cfg.get("model_type", ""))
        if architecture not in LLAMA_ARCHITECTURES | DEEPSEEK_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {architecture!r}; kvserve supports "
                f"{sorted(LLAMA_ARCHITECTURES | DEEPSEEK_ARCHITECTURES)}"
            )
        num_heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        eos = cfg.get("eos_token_id")
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        rope_scaling = cfg.get("rope_scaling")
        rope_theta = cfg.get("rope_theta")
        # transformers 5 folds rope_theta and scaling into `rope_parameters`.
        rope_params = cfg.get("rope_parameters")
        if isinstance(rope_params, dict):
            rope_theta = rope_params.get("rope_theta", rope_theta)
            if rope_params.get("rope_type", "default") != "default":
                rope_scaling = rope_params
        if rope_scaling is not None and rope_scaling.get("rope_type", rope_scaling.get("type")) in (None, "default"):
            rope_scaling = None
        sliding = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
        return cls(
            architecture=architecture,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg.get("intermediate_size", 4 * hidden),
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or hidden // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=architecture == "Qwen2ForCausalLM" or bool(cfg.get("attention_bias", False)),
            sliding_window=sliding,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            hf_config=cfg,
        )

    @classmethod
    def from_folder(cls, path: str) -> ModelConfig:
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise ValueError(f"{path} has no config.json: not a Hugging Face model folder")
        with open(config_path) as f:
            cfg = json.load(f)
        generation_config = os.path.join(path, "generation_config.json")
        config = cls.from_hf_dict(cfg)
        if os.path.isfile(generation_config):
            with open(generation_config) as f:
                eos = json.load(f).get("eos_token_id")
            if eos is not None:
                config.eos_token_ids |= set(eos if isinstance(eos, list) else [eos])
        return config

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> ModelConfig:
        arch = meta["general.architecture"]
        if arch not in ("llama", "qwen2", "mistral"):
            raise ValueError(f"unsupported GGUF architecture {arch!r}; kvserve reads llama, qwen2 and mistral GGUFs")

        def key(name: str, default: Any = None) -> Any:
            return meta.get(f"{arch}.{name}", default)

        hidden = key("embedding_length")
        num_heads = key("attention.head_count")
        rope_scaling = None
        if key("rope.scaling.type") == "linear":
            rope_scaling = {"rope_type": "linear", "factor": key("rope.scaling.factor")}
        eos = meta.get("tokenizer.ggml.eos_token_id")
        vocab = key("vocab_size") or meta.get("tokenizer.ggml.tokens")  # arrays are read as their length
        hf_arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}[arch]
        return cls(
            architecture=hf_arch,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=key("feed_forward_length"),
            num_layers=key("block_count"),
            num_heads=num_heads,
            num_kv_heads=key("attention.head_count_kv") or num_heads,
            head_dim=key("attention.key_length") or hidden // num_heads,
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(key("rope.freq_base", 10000.0)),
            rope_scaling=rope_scaling,
            max_position_embeddings=key("context_length", 2048),
            tie_word_embeddings=False,  # decided by the loader: no output.weight tensor means tied
            attention_bias=arch == "qwen2",
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids={eos} if eos is not None else set(),
        )

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes of KV cache one token takes across all layers."""
        if self.is_mla:
            width = self.hf_config["kv_lora_rank"] + self.hf_config["qk_rope_head_dim"]
            return self.num_layers * width * dtype_bytes
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * dtype_bytes


def _arch_from_model_type(model_type: str) -> str:
    return {
        "llama": "LlamaForCausalLM",
        "mistral": "MistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "deepseek_v2": "DeepseekV2ForCausalLM",
        "deepseek_v3": "DeepseekV3ForCausalLM",
    }.get(model_type, model_type)
