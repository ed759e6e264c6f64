"""BlockPool and KVCacheManager unit tests: exact block ids, reference counts, LRU order."""

import pytest

from kvserve.kv.block_pool import BlockPool
from kvserve.kv.kv_cache_manager import KVCacheManager
from kvserve.kv.prefix_hash import block_hash, extend_block_hashes, root_hash
from kvserve.request import Request
from kvserve.sampling_params import SamplingParams


def ids(blocks):
    return [b.block_id for b in blocks]


def test_allocate_takes_lowest_free_ids_in_order():
    pool = BlockPool(8)
    assert ids(pool.allocate(3)) == [0, 1, 2]
    assert ids(pool.allocate(2)) == [3, 4]
    assert pool.num_free_blocks == 3


def test_free_appends_to_tail_and_reuse_follows_fifo():
    pool = BlockPool(4)
    a = pool.allocate(4)
    pool.free([a[2], a[0]])
    assert [b.block_id for b in pool.free_queue] == [2, 0]
    assert ids(pool.allocate(1)) == [2]


def test_refcounts_shared_block_returns_only_after_last_free():
    pool = BlockPool(2)
    (block,) = pool.allocate(1)
    pool.share([block])
    assert block.ref_count == 2
    pool.free([block])
    assert pool.num_free_blocks == 1
    pool.free([block])
    assert pool.num_free_blocks == 2
    with pytest.raises(AssertionError):
        pool.free([block])


def test_over_allocation_raises():
    pool = BlockPool(2)
    with pytest.raises(RuntimeError):
        pool.allocate(3)


def test_cached_block_is_evicted_lru_and_revived_from_middle():
    pool = BlockPool(3)
    blocks = pool.allocate(3)
    for i, b in enumerate(blocks):
        pool.cache_block(b, bytes([i]) * 32, (i,))
    pool.free(blocks)  # free order: 0, 1, 2 -> LRU is 0
    hit = pool.lookup(bytes([1]) * 32, (1,))
    assert hit is blocks[1]
    pool.touch([hit])  # O(1) removal from the middle of the free queue
    assert [b.block_id for b in pool.free_queue] == [0, 2]
    (new,) = pool.allocate(1)
    assert new.block_id == 0 and new.block_hash is None  # block 0 evicted
    assert pool.lookup(bytes([0]) * 32, (0,)) is None
    assert pool.lookup(bytes([2]) * 32, (2,)) is blocks[2]


def test_lookup_compares_tokens_so_collisions_miss():
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    pool.cache_block(b, b"h" * 32, (1, 2, 3))
    assert pool.lookup(b"h" * 32, (1, 2, 3)) is b
    assert pool.lookup(b"h" * 32, (9, 9, 9)) is None


def test_hash_chain_changes_from_the_changed_block_on():
    root = root_hash("model-a")
    a = list(range(64))
    b = list(a)
    b[40] = 999  # in block 2 (block size 16)
    ha, hb = [], []
    extend_block_hashes(ha, root, lambda s, e: a[s:e], 64, 16)
    extend_block_hashes(hb, root, lambda s, e: b[s:e], 64, 16)
    assert ha[:2] == hb[:2]
    assert all(x != y for x, y in zip(ha[2:], hb[2:]))
    assert block_hash(root, a[:16]) == ha[0]
    assert root_hash("model-b") != root  # another model never shares blocks
    partial = []
    extend_block_hashes(partial, root, lambda s, e: a[s:e], 40, 16)
    assert partial == ha[:2]  # only full blocks are hashed


def make_request(rid, tokens, max_tokens=4):
    return Request(rid, list(tokens), SamplingParams(max_tokens=max_tokens), max_tokens=max_tokens)


def test_manager_allocates_by_token_count_and_frees_tail_first():
    kv = KVCacheManager(10, 4, True, root_hash("m"))
    req = make_request("a", range(10))
    assert kv.allocate_slots(req, 10)
    assert kv.block_ids(req) == [0, 1, 2]
    req.num_computed_tokens = 10
    assert kv.allocate_slots(req, 1)  # slot 10 still in block 2
    assert kv.block_ids(req) == [0, 1, 2]
    req.num_computed_tokens = 12
    assert kv.allocate_slots(req, 1)
    assert kv.block_ids(req) == [0, 1, 2, 3]
    kv.free(req)
    assert [b.block_id for b in kv.pool.free_queue][-4:] == [3, 2, 1, 0]
    kv.pool.check_idle()


def test_manager_refuses_without_side_effects_when_short():
    kv = KVCacheManager(2, 4, True, root_hash("m"))
    req = make_request("a", range(12))
    assert not kv.allocate_slots(req, 12)
    assert kv.pool.num_free_blocks == 2
    assert "a#0" not in kv.block_tables


def test_prefix_hit_reuses_exact_blocks_and_stops_one_token_short():
    kv = KVCacheManager(16, 4, True, root_hash("m"))
    first = make_request("a", range(12))
    assert kv.allocate_slots(first, 12)
    first.num_computed_tokens = 12
    kv.cache_computed_blocks(first)
    kv.free(first)
    same = make_request("b", range(12))
    hits = kv.get_computed_blocks(same)
    assert ids(hits) == [0, 1]  # a fully cached 12-token prompt still computes its last block
    longer = make_request("c", list(range(12)) + [50, 51])
    assert ids(kv.get_computed_blocks(longer)) == [0, 1, 2]
    assert kv.allocate_slots(longer, 2, kv.get_computed_blocks(longer))
    assert kv.block_ids(longer)[:3] == [0, 1, 2]
    assert all(b.ref_count == 1 for b in kv.block_tables["c#0"])
    other = make_request("d", [7] + list(range(1, 12)))
    assert kv.get_computed_blocks(other) == []


def test_cached_block_in_use_is_never_evicted():
    kv = KVCacheManager(3, 4, True, root_hash("m"))
    a = make_request("a", range(8))
    assert kv.allocate_slots(a, 8)
    a.num_computed_tokens = 8
    kv.cache_computed_blocks(a)
    b = make_request("b", list(range(8)) + [1, 2])
    hits = kv.get_computed_blocks(b)
    assert ids(hits) == [0, 1]
    assert kv.allocate_slots(b, 2, hits)  # needs one new block: block 2
    assert kv.block_ids(b) == [0, 1, 2]
    c = make_request("c", range(100, 104))
    assert not kv.allocate_slots(c, 4)  # all three in use: nothing to evict
    kv.free(b)
    kv.free(a)
    kv.pool.check_idle()
