"""Building blocks shared by the model files: linear layers and embeddings over dense or quantized
weights, RMSNorm (with the residual add fused in), rotary embeddings, the SwiGLU MLP.

Each module that has a compiled CPU kernel (kvserve/kernels: linear.cpp, fused.cpp) holds `ops`, the
kernel module, set once at load by `use_cpu_kernels`; it is None on CUDA, for non-fp32 inputs, and
with KVSERVE_CPU_KERNELS=0, and then the module runs its plain PyTorch path, the reference.
"""

from __future__ import annotations

import math
import threading
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from kvserve.models.quantized import QuantizedWeight

if TYPE_CHECKING:
    from kvserve.distributed.group import ParallelGroup

# Rows of x up to which a dense fp32 product takes dot products (the weight streams from memory once,
# where BLAS's matrix-vector path reads it at a third of the memory's speed on the project's AVX2 CPUs,
# PEERS.md); past it the kernel's panels (kernels/linear.cpp) multiply in cache-sized blocks.
F32_KERNEL_MAX_ROWS = 4
# Rows of x up to which a quantized product quantizes x to int16 blocks and takes row-wise integer dot
# products; past it the kernel multiplies integer panels of the weight kept in cache (the codes widened
# to int16, x quantized as above). -1 leaves the crossover to the kernels (kernels/linear.cpp,
# kDefaultIntRows: 3 rows on AVX-512 builds, 4 on AVX2 ones); a number forces it.
INT_KERNEL_MAX_ROWS = -1
_EMPTY = torch.empty(0)


class Workspace:
    """Buffers that a step's large activations reuse, layer after layer and step after step, one set per
    thread (each engine runs its steps on one thread). A fresh tensor of a MiB or more is a fresh
    mapping (kvserve/heap.py), its pages faulted in again, zeroed, every time: the MLP's [T, 2I] and
    [T, I] intermediates of a 256-token prefill step took ~34,000 page faults a step in 30 layers. A
    buffer that a step did not use is dropped at the step's end (`end_step`: a decode-only step after
    prefill steps does not keep them through its logits; the server's peak RSS went from 660 to
    663-664 MiB), and all of them when the engine falls idle (`release`; a tensor-parallel worker rank
    keeps its own until its next step that does not use them)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def _state(self) -> tuple[dict[str, torch.Tensor], set[str]]:
        local = self._local
        if not hasattr(local, "buffers"):
            local.buffers, local.used = {}, set()
        return local.buffers, local.used

    def get(self, name: str, rows: int, cols: int) -> torch.Tensor | None:
        """A float32 [rows, cols] view of the buffer `name`, grown to fit, its contents garbage; None under
        WORKSPACE_MIN_BYTES (such a tensor comes from the heap's top, reused anyway)."""
        need = rows * cols
        if need * 4 < WORKSPACE_MIN_BYTES:
            return None
        buffers, used = self._state()
        buffer = buffers.get(name)
        if buffer is None or buffer.numel() < need:
            buffers[name] = buffer = torch.empty(need, dtype=torch.float32)  # not the default dtype
        used.add(name)
        return buffer[:need].view(rows, cols)

    def end_step(self) -> None:
        """After a forward: drops this thread's buffers that it did not use."""
        buffers, used = self._state()
        for name in [name for name in buffers if name not in used]:
            del buffers[name]
        used.clear()

    def held_bytes(self) -> int:
        """What this thread's buffers hold."""
        return sum(buffer.numel() * buffer.element_size() for buffer in self._state()[0].values())

    def release(self) -> None:
        """Drops this thread's buffers (the engine fell idle: their memory goes back to the OS)."""
        buffers, used = self._state()
        buffers.clear()
        used.clear()


WORKSPACE = Workspace()
# WORKSPACE holds tensors of at least this size: glibc maps (and unmaps) allocations of 1 MiB or more
# (heap.SERVE_MMAP_THRESHOLD); smaller ones come from the heap, reused anyway.
WORKSPACE_MIN_BYTES = 1 << 20


def kernel_for(module: nn.Module, x: torch.Tensor) -> ModuleType | None:
    """The module's compiled kernels when they can take x (fp32 on the CPU), else None."""
    ops = getattr(module, "ops", None)
    return ops if ops is not None and x.dtype == torch.float32 and x.is_cpu else None


class Linear(nn.Module):
    """y = x W^T (+ b), with W dense (`weight`, an nn.Parameter) or quantized (`qweight`, read by the
    kernels where they lie; expanded per product on the plain path). Names match nn.Linear's."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight: nn.Parameter | None = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.qweight: QuantizedWeight | None = None
        self.ops: ModuleType | None = None
        # Tensor parallelism: a row-parallel layer (its inputs split across ranks) sums its partial
        # products over the group (distributed/sharding.py); None otherwise.
        self.reduce: ParallelGroup | None = None

    def set_quantized(self, qweight: QuantizedWeight) -> None:
        """Holds qweight instead of the dense weight, which is dropped (never allocated for real)."""
        if qweight.shape != (self.out_features, self.in_features):
            raise ValueError(
                f"quantized weight of shape {qweight.shape}, expected {(self.out_features, self.in_features)}"
            )
        self.qweight = qweight
        self.weight = None

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x @ W^T (+ b). `out`: a float32 [rows of x, out_features] buffer to write the result into, taken
        where a compiled product runs (`writes_into(x)`); elsewhere a new tensor."""
        result = self._product(x, out)
        return result if self.reduce is None else self.reduce.all_reduce(result)

    def writes_into(self, x: torch.Tensor) -> bool:
        """Whether forward(x, out) writes into out: a compiled product (q_linear, f32_linear), unreduced."""
        if self.reduce is not None or kernel_for(self, x) is None:
            return False
        return self.qweight is not None or self.weight.dtype == torch.float32

    def _product(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        ops = self.ops
        if self.qweight is not None:
            if ops is not None and x.dtype == torch.float32 and x.is_cpu:
                q = self.qweight  # the step's hot path: ~120 calls a step, so no more Python than this
                x2 = x if x.dim() == 2 and x.is_contiguous() else x.reshape(-1, self.in_features).contiguous()
                out = ops.q_linear(
                    x2,
                    q.codes,
                    q.scales,
                    _EMPTY if q.mins is None else q.mins,
                    _EMPTY if self.bias is None else self.bias,
                    q.bits,
                    INT_KERNEL_MAX_ROWS,
                    out,
                )
                return out if x2 is x else out.view(*x.shape[:-1], self.out_features)
            return F.linear(x, self.qweight.dequantize(x.dtype), self.bias)
        ops = kernel_for(self, x)
        if ops is not None and self.weight.dtype == torch.float32:
            x2 = x if x.dim() == 2 and x.is_contiguous() else x.reshape(-1, self.in_features).contiguous()
            bias = _EMPTY if self.bias is None else self.bias
            out = ops.f32_linear(x2, self.weight, bias, F32_KERNEL_MAX_ROWS, out)
            return out if x2 is x else out.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)

    def projection(self, ops: ModuleType):
        """This weight as a compiled Projection (kernels/decoder.cpp), which dispatches as forward does."""
        bias = _EMPTY if self.bias is None else self.bias
        if (q := self.qweight) is not None:
            mins = _EMPTY if q.mins is None else q.mins
            return ops.quantized_projection(q.codes, q.scales, mins, bias, q.bits, INT_KERNEL_MAX_ROWS)
        return ops.dense_projection(self.weight, bias, F32_KERNEL_MAX_ROWS)

    def extra_repr(self) -> str:
        kind = f"{self.qweight.bits}-bit" if self.qweight is not None else "dense"
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind}"


class Embedding(nn.Module):
    """Token embeddings, dense (`weight`) or quantized (`qweight`: only the looked-up rows are expanded).
    Vocabulary-parallel (tensor parallelism): this rank holds the rows of ids [first_id, first_id +
    num_embeddings), looks those up, zeroes the rest, and the all-reduce completes every row."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.weight: nn.Parameter | None = nn.Parameter(torch.empty(num_embeddings, embedding_dim))
        self.qweight: QuantizedWeight | None = None
        self.first_id = 0
        self.reduce: ParallelGroup | None = None

    def set_quantized(self, qweight: QuantizedWeight) -> None:
        self.qweight = qweight
        self.weight = None

    def forward(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.reduce is None:
            return self._lookup(ids, dtype)
        local = ids - self.first_id
        outside = (local < 0) | (local >= self.num_embeddings)
        rows = self._lookup(local.masked_fill(outside, 0), dtype)
        return self.reduce.all_reduce(rows.masked_fill_(outside[:, None], 0.0))

    def _lookup(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.qweight is not None:
            return self.qweight.select_rows(ids).dequantize(dtype)
        return F.embedding(ids, self.weight).to(dtype)


def use_cpu_kernels(model: nn.Module, ops: ModuleType | None) -> None:
    """Sets the compiled kernels (or None: the plain path) on every module that has some."""
    for module in model.modules():
        if isinstance(module, (Linear, RMSNorm, SwiGLU)):
            module.ops = ops


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.ops: ModuleType | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 as HF does, so bf16 runs match its reference.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def add_forward(self, x: torch.Tensor | None, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x): the residual stream's add fused with the next norm.
        x None: the stream starts here (norm(residual), residual). The kernel adds into `residual`
        in place, so the caller hands over a residual that nothing else reads."""
        if (ops := kernel_for(self, residual)) is not None and residual.is_contiguous():
            return ops.add_rms_norm(x, residual, self.weight, self.eps), residual
        if x is not None:
            residual = residual + x
        return self(residual), residual


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), with gate and up fused into one matrix product."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)
        self.ops: ModuleType | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up_proj = self.gate_up_proj
        if (
            x.dim() == 2
            and (ops := kernel_for(self, x)) is not None
            and gate_up_proj.writes_into(x)
            and (buffer := WORKSPACE.get("gate_up", x.shape[0], gate_up_proj.out_features)) is not None
        ):  # a prefill step's: the intermediates in WORKSPACE's buffers, reused (the SiLU product's where
            # it too is large enough)
            silu = WORKSPACE.get("silu", x.shape[0], self.intermediate_size)
            return self.down_proj(ops.silu_mul(gate_up_proj(x, buffer), silu))
        gate_up = gate_up_proj(x)  # [T, 2I]
        if (ops := kernel_for(self, gate_up)) is not None and gate_up.dim() == 2:
            return self.down_proj(ops.silu_mul(gate_up))
        gate, up = gate_up.split(self.intermediate_size, dim=-1)  # [T, I] each
        return self.down_proj(F.silu(gate) * up)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies [head_dim/2], with Llama-3 and linear rope scaling."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if not scaling:
        return inv_freq.float()
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":
        return (inv_freq / factor).float()
    if kind == "llama3":
        # Llama 3.1: long wavelengths slowed by `factor`, short kept, a smooth ramp between.
        low_freq_factor = float(scaling["low_freq_factor"])
        high_freq_factor = float(scaling["high_freq_factor"])
        old_context = float(scaling["original_max_position_embeddings"])
        low_freq_wavelen = old_context / low_freq_factor
        high_freq_wavelen = old_context / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled).float()
    raise ValueError(f"unsupported rope scaling {kind!r} (supported: linear, llama3)")


class RotaryEmbedding(nn.Module):
    """cos/sin tables indexed by absolute position; rotate-half (GPT-NeoX / HF) convention."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None = None) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # [P, D/2]
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token cos/sin [T, 1, D/2], gathered once per step and shared by every layer."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D]; cos/sin [T, 1, D/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
