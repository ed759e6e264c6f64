"""KV blocks of every rank as one row: what the lower cache tiers store under tensor parallelism.

Each rank holds its shard of every block (its KV heads; MLA's latent whole). The tiers (kv/offload.py)
run on rank 0 and move rows; under tensor parallelism a row is the concatenation of every rank's
BlockIO row of that block, in rank order:

    row = [ rank 0's row | rank 1's row | ... ]      each row_nbytes / N bytes (every rank's is the same size)

so one disk-tier file holds a block for all ranks, and a tier written with N ranks is read back only
with N ranks (the block hash chain's root includes N). Gathering a block: rank 0 sends OP_KV_GATHER
with the block ids, every rank packs its rows, rank 0 gathers them. Loading: OP_KV_SCATTER, rank 0
broadcasts the rows, every rank writes its part.
"""

from __future__ import annotations

import torch

from kvserve.distributed.group import OP_KV_GATHER, OP_KV_SCATTER, ParallelGroup
from kvserve.kv.block_io import BlockIO


class ShardedBlockIO:
    """BlockIO's interface on rank 0 (gather, scatter, row_nbytes, device) over every rank's shard."""

    def __init__(self, local: BlockIO, tp: ParallelGroup) -> None:
        self.local, self.tp = local, tp
        self.row_nbytes = local.row_nbytes * tp.world_size
        self.device = local.device

    def gather(self, block_ids: list[int]) -> torch.Tensor:
        """[len(block_ids), row_nbytes] uint8: every rank's rows of those blocks."""
        local = self.local.gather(block_ids)  # before the command: nothing may fail between it and the gather
        self.tp.send(OP_KV_GATHER, torch.tensor(block_ids, dtype=torch.int64))
        parts = self.tp.gather_rows(local)  # [N, k, local row]
        return parts.transpose(0, 1).reshape(len(block_ids), self.row_nbytes)

    def scatter(self, block_ids: list[int], rows: torch.Tensor) -> None:
        rows = rows.contiguous()
        self.tp.send(OP_KV_SCATTER, torch.tensor(block_ids, dtype=torch.int64))
        rows = self.tp.broadcast_rows(rows)
        try:
            self.local.scatter(block_ids, rows_of_rank(rows, 0, self.tp.world_size))
        except BaseException as exc:  # the others wrote their parts: the cache is no longer one block
            raise self.tp.fail(f"tensor-parallel KV load failed on rank 0: {exc!r}", exc) from exc


def rows_of_rank(rows: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """A rank's part [k, row / N] of whole rows [k, row]."""
    k = rows.shape[0]
    return rows.view(k, world_size, -1)[:, rank].contiguous()


def serve_block_io(op: int, block_ids: list[int], local: BlockIO, tp: ParallelGroup) -> None:
    """A worker's side of OP_KV_GATHER / OP_KV_SCATTER."""
    if op == OP_KV_GATHER:
        tp.gather_rows(local.gather(block_ids))
        return
    rows = torch.empty(len(block_ids), local.row_nbytes * tp.world_size, dtype=torch.uint8, device=local.device)
    local.scatter(block_ids, rows_of_rank(tp.broadcast_rows(rows), tp.rank, tp.world_size))
