"""GGUF header (key/value metadata and tensor directory), read fast.

gguf.GGUFReader parses every field, including the ~100k-entry vocabulary and merge arrays, into numpy
objects, which takes seconds; walking the header ourselves and skipping arrays takes milliseconds.
Arrays are recorded as their length only (the tokenizer converter reads their contents itself).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from typing import Any


@dataclass
class GGUFTensorInfo:
    name: str
    dims: tuple[int, ...]  # GGML order: dims[0] is the innermost (contiguous) axis
    ggml_type: int
    offset: int  # absolute byte offset of the data in the file


@dataclass
class GGUFHeader:
    meta: dict[str, Any]
    tensors: list[GGUFTensorInfo] = field(default_factory=list)


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_header(path: str) -> GGUFHeader:
    """Reads a GGUF file's key/value header; arrays are skipped and recorded as their length.

    gguf.GGUFReader parses every field, including the ~100k-entry vocabulary and merge arrays, into numpy objects,
    which takes seconds; walking the header ourselves and skipping arrays takes a few tens of milliseconds.
    Handles GGUF v2/v3 little-endian files (all current ones); anything else raises ValueError."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        (version,) = struct.unpack_from("<I", buf, 4)
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} (or big-endian) is not read by the fast path")
        num_tensors, num_kv = struct.unpack_from("<QQ", buf, 8)
        offset = 24
        meta: dict[str, Any] = {}

        def read_string(at: int) -> tuple[str, int]:
            (length,) = struct.unpack_from("<Q", buf, at)
            start = at + 8
            return buf[start : start + length].decode("utf-8", errors="replace"), start + length

        def skip_value(vtype: int, at: int) -> int:
            if vtype in _GGUF_SCALARS:
                return at + struct.calcsize(_GGUF_SCALARS[vtype])
            if vtype == _GGUF_STRING:
                (length,) = struct.unpack_from("<Q", buf, at)
                return at + 8 + length
            if vtype == _GGUF_ARRAY:
                item_type, count = struct.unpack_from("<IQ", buf, at)
                at += 12
                if item_type in _GGUF_SCALARS:
                    return at + count * struct.calcsize(_GGUF_SCALARS[item_type])
                for _ in range(count):
                    at = skip_value(item_type, at)
                return at
            raise ValueError(f"{path}: unknown GGUF value type {vtype}")

        for _ in range(num_kv):
            key, offset = read_string(offset)
            (vtype,) = struct.unpack_from("<I", buf, offset)
            offset += 4
            if vtype in _GGUF_SCALARS:
                (meta[key],) = struct.unpack_from(_GGUF_SCALARS[vtype], buf, offset)
            elif vtype == _GGUF_STRING:
                meta[key], _ = read_string(offset)
            elif vtype == _GGUF_ARRAY:
                (meta[key],) = struct.unpack_from("<Q", buf, offset + 4)  # the length is all we need
            offset = skip_value(vtype, offset)

        infos = []
        for _ in range(num_tensors):
            name, offset = read_string(offset)
            (n_dims,) = struct.unpack_from("<I", buf, offset)
            dims = struct.unpack_from(f"<{n_dims}Q", buf, offset + 4)
            ggml_type, rel = struct.unpack_from("<IQ", buf, offset + 4 + 8 * n_dims)
            offset += 4 + 8 * n_dims + 12
            infos.append(GGUFTensorInfo(name, tuple(dims), ggml_type, rel))
        alignment = int(meta.get("general.alignment", 32))
        data_start = -(-offset // alignment) * alignment  # tensor data begins at the next aligned offset
        for info in infos:
            info.offset += data_start
        return GGUFHeader(meta, infos)


def _read_slow(path: str) -> dict[str, Any]:
    """Fallback for files the fast path does not read (big-endian, GGUF v1): gguf's own reader."""
    from gguf import GGUFReader

    meta: dict[str, Any] = {}
    for key, fld in GGUFReader(path).fields.items():
        if fld.types and fld.types[0].name == "ARRAY":
            meta[key] = len(fld.data)
            continue
        try:
            meta[key] = fld.contents()
        except Exception:  # noqa: BLE001 - exotic field types are irrelevant to the tokenizer
            continue
    return meta


def read_gguf_metadata(path: str) -> dict[str, Any]:
    try:
        return read_gguf_header(path).meta
    except (ValueError, struct.error):
        return _read_slow(path)
