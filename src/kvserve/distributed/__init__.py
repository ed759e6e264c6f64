"""Tensor parallelism over torch.distributed: one model split across N ranks (processes or devices).

- sharding.py: which rows or columns of each weight a rank holds (Megatron-style), and the rank's
  ModelConfig (its heads, its slice of the MLP and of the vocabulary).
- group.py: the process group: the all-reduce after a row-parallel product, the gather of the
  vocabulary-parallel logits, the minimum of the ranks' KV blocks.
- protocol.py: one engine step's flat batch packed into one int64 tensor, broadcast by rank 0.
- workers.py: starting the ranks (spawned here, or launched by torchrun / on other nodes), a
  worker's loop, and failing fast when one dies.

Rank 0 alone runs the scheduler, the block manager (one hash chain), sampling and the server; the
other ranks hold no request objects: each step they receive the flat batch, run their shard of the
forward into their shard of the KV cache, and send their slice of the logits to rank 0.
"""
