"""BlockIO: whole KV blocks of every layer packed into flat byte rows, and back.

A row is the unit the lower cache tiers (kv/tiers.py) store: for one block, the
concatenation over every cache tensor of that tensor's slice `t[:, block]`
(K and V for MHA/GQA, the latent for MLA, int8 codes and their scales for a
quantized cache), each at a 16-byte-aligned offset. Every cache tensor keeps
its blocks on dim 1, which is what makes one layout serve all of them.

The row layout depends only on the model, the KV dtype and the block size, all
of which the block hash chain includes, so a row found under a hash always
fits the cache that looks it up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvserve.kv.quant import as_bytes, block_tensors

_ALIGN = 16


@dataclass(frozen=True)
class _Slice:
    tensor: torch.Tensor  # [lead, num_blocks, ...] with blocks on dim 1
    offset: int  # byte offset of this tensor's block slice in a row
    nbytes: int  # bytes of t[:, block]


class BlockIO:
    def __init__(self, kv_caches: list) -> None:
        tensors: list[torch.Tensor] = []
        for cache in kv_caches:
            tensors += [as_bytes(t) for t in block_tensors(cache)]  # rows are bytes: fp8 moves as uint8
        self.slices: list[_Slice] = []
        offset = 0
        for t in tensors:
            nbytes = t[:, 0].numel() * t.element_size()
            self.slices.append(_Slice(t, offset, nbytes))
            offset += -(-nbytes // _ALIGN) * _ALIGN
        self.row_nbytes = offset
        self.device = tensors[0].device

    def gather(self, block_ids: list[int]) -> torch.Tensor:
        """[len(block_ids), row_nbytes] uint8 rows on the cache's device, a copy of those blocks."""
        ids = torch.tensor(block_ids, device=self.device)
        rows = torch.empty(len(block_ids), self.row_nbytes, dtype=torch.uint8, device=self.device)
        for s in self.slices:
            lead = s.tensor.shape[0]
            src = s.tensor.index_select(1, ids).reshape(lead, len(block_ids), -1).view(torch.uint8)  # [lead, k, bytes]
            rows[:, s.offset : s.offset + s.nbytes].view(len(block_ids), lead, -1).copy_(src.transpose(0, 1))
        return rows

    def scatter(self, block_ids: list[int], rows: torch.Tensor) -> None:
        """Writes rows ([k, row_nbytes] uint8 on the cache's device) into the blocks `block_ids`."""
        ids = torch.tensor(block_ids, device=self.device)
        k = len(block_ids)
        for s in self.slices:
            t = s.tensor
            lead = t.shape[0]
            src = rows[:, s.offset : s.offset + s.nbytes].view(k, lead, -1).transpose(0, 1).contiguous()  # [lead, k, B]
            t.index_copy_(1, ids, src.view(t.dtype).view(lead, k, *t.shape[2:]))
