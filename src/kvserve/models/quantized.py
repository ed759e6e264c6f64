"""Quantized linear weights, in the one layout the CPU kernels read (kernels/linear.cpp).

A GGUF file's quantized blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) are repacked once at
load, never expanded to fp32; `--quantization int8` quantizes a float weight the same way (Q8_0's
scheme). Every format becomes integer codes with a float16 scale per group and, for formats with
an offset, a float16 min per 32 elements:

    w[n, k] = scale[n, k // G] * code[n, k] + min[n, k // 32]         G = 32, or 16 for Q6_K

- 4-bit codes (Q4_0, Q4_1, Q4_K): two per byte, [N, K/2] uint8; in each block of 32 elements byte
  j holds element j in its low nibble and element j + 16 in its high one (GGML's Q4_0/Q4_1 order,
  so those two copy their bytes as they are).
- 8-bit codes (everything else, 5- and 6-bit codes included): one signed byte each, [N, K] int8.

Exact for Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0, whose scales are float16 already (Q4_0's min is -8 x
its scale, exact in float16). K-quants' sub-block scales (a float16 super-block scale times a
6-bit integer) are rounded to float16 once: a relative error of at most 2^-11 per scale, far below
the step of the codes they scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

GROUP = 32  # elements per block of codes and per min


@dataclass
class QuantizedWeight:
    codes: torch.Tensor  # [N, K/2] uint8 (bits 4) or [N, K] int8 (bits 8)
    scales: torch.Tensor  # [N, K/G] float16, G = 32 or 16
    mins: torch.Tensor | None  # [N, K/32] float16, or None for formats without an offset
    bits: int
    in_features: int

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    @property
    def group(self) -> int:
        return self.in_features // self.scales.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.mins) if t is not None)

    def unpacked_codes(self) -> torch.Tensor:  # [N, K] int8, in element order
        if self.bits == 8:
            return self.codes
        blocks = self.codes.view(self.out_features, -1, GROUP // 2)  # [N, K/32, 16]
        low, high = blocks & 0x0F, blocks >> 4
        return torch.cat((low, high), dim=-1).view(self.out_features, self.in_features).to(torch.int8)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:  # [N, K]
        """The float weight: the reference the kernels are checked against, and the plain PyTorch
        path (CUDA, or KVSERVE_CPU_KERNELS=0), which expands it per product."""
        n, k = self.shape
        w = self.unpacked_codes().float().view(n, -1, self.group) * self.scales.float().unsqueeze(-1)
        w = w.view(n, k)
        if self.mins is not None:
            w = (w.view(n, -1, GROUP) + self.mins.float().unsqueeze(-1)).view(n, k)
        return w.to(dtype)

    def select_rows(self, rows: torch.Tensor) -> QuantizedWeight:
        """These output rows (a row permutation, or an embedding lookup's tokens)."""
        mins = self.mins[rows] if self.mins is not None else None
        return QuantizedWeight(self.codes[rows], self.scales[rows], mins, self.bits, self.in_features)

    def row_range(self, start: int, end: int) -> QuantizedWeight:
        """Output rows [start, end) (a column-parallel shard), as contiguous copies."""
        mins = self.mins[start:end].clone() if self.mins is not None else None
        return QuantizedWeight(
            self.codes[start:end].clone(), self.scales[start:end].clone(), mins, self.bits, self.in_features
        )

    def column_range(self, start: int, end: int) -> QuantizedWeight:
        """Input columns [start, end) (a row-parallel shard): whole 32-element groups only, which keeps
        4-bit codes' byte pairs and every group's scale and min intact."""
        if start % GROUP or (end % GROUP and end != self.in_features):
            raise ValueError(f"columns [{start}, {end}) do not fall on {GROUP}-element groups")
        per_byte = 2 if self.bits == 4 else 1
        group = self.group
        codes = self.codes[:, start // per_byte : end // per_byte].contiguous()
        scales = self.scales[:, start // group : end // group].contiguous()
        mins = self.mins[:, start // GROUP : end // GROUP].contiguous() if self.mins is not None else None
        return QuantizedWeight(codes, scales, mins, self.bits, end - start)

    def to(self, device: torch.device) -> QuantizedWeight:
        mins = self.mins.to(device) if self.mins is not None else None
        return QuantizedWeight(self.codes.to(device), self.scales.to(device), mins, self.bits, self.in_features)

    def widened(self, bits: int, group: int, with_mins: bool) -> QuantizedWeight:
        """The same values in a wider format (8-bit codes, 16-element scale groups, zero mins): exact."""
        codes = self.unpacked_codes() if bits == 8 and self.bits == 4 else self.codes
        scales = self.scales.repeat_interleave(self.group // group, dim=1) if group != self.group else self.scales
        mins = self.mins
        if with_mins and mins is None:
            mins = torch.zeros(self.out_features, self.in_features // GROUP, dtype=torch.float16, device=codes.device)
        return QuantizedWeight(codes, scales, mins, bits, self.in_features)

    @staticmethod
    def concat(parts: list[QuantizedWeight]) -> QuantizedWeight:
        """Stacked along the output rows (fused Q/K/V, gate/up). Parts of different formats (a Q4_K_M
        file mixes Q4_K and Q6_K) are first widened to one that holds them all exactly."""
        if len({p.in_features for p in parts}) != 1:
            raise ValueError("fused weights must share their input size")
        bits = max(p.bits for p in parts)
        group = min(p.group for p in parts)
        if bits == 4 and group != GROUP:
            bits = 8  # 4-bit codes take 32-element groups only
        with_mins = any(p.mins is not None for p in parts)
        parts = [p.widened(bits, group, with_mins) for p in parts]
        mins = torch.cat([p.mins for p in parts]) if with_mins else None
        return QuantizedWeight(
            torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]), mins, bits, parts[0].in_features
        )


def quantize_int8(weight: torch.Tensor) -> QuantizedWeight:
    """A float weight [N, K] (K a multiple of 32) as symmetric int8 codes with one float16 scale per
    32 elements, like GGUF's Q8_0: scale = max|w| / 127 over the group, code = round(w / scale)."""
    n, k = weight.shape
    if k % GROUP:
        raise ValueError(f"int8 weights need an input size that is a multiple of {GROUP}, got {k}")
    groups = weight.float().view(n, k // GROUP, GROUP)
    scales = (groups.abs().amax(dim=-1) / 127).to(torch.float16)  # rounded first: the codes use it as stored
    divisor = scales.float().unsqueeze(-1)
    codes = torch.where(divisor > 0, groups / divisor.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    codes = codes.round().clamp(-127, 127).to(torch.int8).view(n, k)
    return QuantizedWeight(codes, scales, None, 8, k)


# ---------------------------------------------------------------- GGUF blocks -> codes, scales, mins

GGUF_QUANTIZED = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"}


def from_gguf(raw: np.ndarray, kind: str, rows: int, cols: int) -> QuantizedWeight:
    """raw [rows, row_bytes] uint8: a GGUF tensor's blocks, row by row (cols elements per row)."""
    if kind not in GGUF_QUANTIZED:
        raise ValueError(f"GGUF type {kind} has no quantized kernel (supported: {sorted(GGUF_QUANTIZED)})")
    block_bytes = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
    b = np.ascontiguousarray(raw).reshape(-1, block_bytes[kind])  # [blocks, bytes], row-major over the tensor
    codes, scales, mins, bits = _UNPACK[kind](b)
    codes = codes.reshape(rows, -1)
    scales = _to_half(scales, kind).reshape(rows, -1)
    mins = _to_half(mins, kind).reshape(rows, -1) if mins is not None else None
    return QuantizedWeight(
        torch.from_numpy(codes),
        torch.from_numpy(scales),
        torch.from_numpy(mins) if mins is not None else None,
        bits,
        cols,
    )


def _to_half(values: np.ndarray, kind: str) -> np.ndarray:
    half = values.astype(np.float16)
    if not np.isfinite(half).all():
        raise ValueError(f"a {kind} scale does not fit float16")
    return half


def _f16(b: np.ndarray, at: int) -> np.ndarray:  # [blocks] float32 from a float16 at byte `at`
    return b[:, at : at + 2].copy().view(np.float16)[:, 0].astype(np.float32)


def _split_nibbles(qs: np.ndarray) -> np.ndarray:  # [..., 16] bytes -> [..., 32] codes in element order
    return np.concatenate((qs & 0x0F, qs >> 4), axis=-1)


def _pack_nibbles(codes: np.ndarray) -> np.ndarray:  # [..., 32] codes 0..15 -> [..., 16] bytes
    return (codes[..., :16] | (codes[..., 16:] << 4)).astype(np.uint8)


def _high_bits(qh: np.ndarray, count: int) -> np.ndarray:  # [blocks, 4] bytes -> [blocks, count] bit j of the uint32
    word = qh.copy().view("<u4")  # [blocks, 1]
    return ((word >> np.arange(count, dtype=np.uint32)) & 1).astype(np.uint8)


def _q4_0(b):
    d = _f16(b, 0)
    return b[:, 2:18].copy(), d, -8 * d, 4


def _q4_1(b):
    return b[:, 4:20].copy(), _f16(b, 0), _f16(b, 2), 4


def _q8_0(b):
    return b[:, 2:34].copy().view(np.int8), _f16(b, 0), None, 8


def _q5_0(b):
    q = _split_nibbles(b[:, 6:22]) | (_high_bits(b[:, 2:6], 32) << 4)
    return (q.astype(np.int16) - 16).astype(np.int8), _f16(b, 0), None, 8


def _q5_1(b):
    q = _split_nibbles(b[:, 8:24]) | (_high_bits(b[:, 4:8], 32) << 4)
    return q.astype(np.int8), _f16(b, 0), _f16(b, 2), 8


def _k_scales_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins per super-block. Bytes 0-3 hold
    scales 0-3 (low 6 bits), bytes 4-7 mins 0-3; scales and mins 4-7 take their low 4 bits from
    bytes 8-11 (low and high nibble) and their high 2 bits from the top of bytes 0-3 and 4-7."""
    low, mid, top = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate((low & 63, (top & 0x0F) | ((low >> 6) << 4)), axis=1)
    mins = np.concatenate((mid & 63, (top >> 4) | ((mid >> 6) << 4)), axis=1)
    return scales.astype(np.float32), mins.astype(np.float32)


def _k_quant_low_bits(qs: np.ndarray) -> np.ndarray:
    """[blocks, 128] bytes -> [blocks, 8, 32]: each 32-byte run holds sub-block 2j in its low
    nibbles and sub-block 2j + 1 in its high ones."""
    runs = qs.reshape(-1, 4, 1, 32)
    return np.concatenate((runs & 0x0F, runs >> 4), axis=2).reshape(-1, 8, 32)


def _q4_k(b):
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k_scales_mins(b[:, 4:16])
    codes = _k_quant_low_bits(b[:, 16:144])  # [blocks, 8, 32]
    return _pack_nibbles(codes), d[:, None] * sc, -(dmin[:, None] * mn), 4


def _q5_k(b):
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k_scales_mins(b[:, 4:16])
    qh = b[:, 16:48]  # [blocks, 32]: bit s of byte l is the high bit of element l of sub-block s
    high = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1  # [blocks, 8, 32]
    codes = _k_quant_low_bits(b[:, 48:176]) | (high << 4)
    return codes.astype(np.int8), d[:, None] * sc, -(dmin[:, None] * mn), 8


def _q6_k(b):
    """210 bytes per 256 elements: ql [128] low 4 bits, qh [64] high 2 bits, 16 int8 scales (one per
    16 elements), d. Each half of 128 elements takes 64 bytes of ql and 32 of qh: element l + 32 i
    (i = 0..3) is nibble (i // 2) of ql[l + 32 (i % 2)] with bits 2i..2i+1 of qh[l], minus 32."""
    ql, qh = b[:, 0:128].reshape(-1, 2, 1, 2, 32), b[:, 128:192].reshape(-1, 2, 1, 32)
    low = np.concatenate((ql & 0x0F, ql >> 4), axis=2).reshape(-1, 2, 4, 32)  # i = 2 * nibble + (i % 2)
    high = (qh >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]) & 3  # [blocks, 2, 4, 32]
    codes = (low | (high << 4)).astype(np.int16) - 32
    scales = b[:, 192:208].copy().view(np.int8).astype(np.float32) * _f16(b, 208)[:, None]  # [blocks, 16]
    return codes.astype(np.int8).reshape(-1, 256), scales, None, 8


_UNPACK = {
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q8_0": _q8_0,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
}
