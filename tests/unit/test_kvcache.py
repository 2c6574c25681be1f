import os
import subprocess
import sys

import pytest

from fleetserve.model.kvcache import KVCacheManager, adapter_key, hash_block_tokens, hash_prompt_blocks
from fleetserve.model.types import AllBlocksCleared, BlockRemoved, BlockStored


def test_prompt_hashes_chain_block_by_block():
    tokens = list(range(40))
    hashes = hash_prompt_blocks(tokens, 16)
    assert len(hashes) == 2  # the trailing 8 tokens make no full block
    assert hashes[0] == hash_block_tokens(None, tokens[:16])
    assert hashes[1] == hash_block_tokens(hashes[0], tokens[16:32])
    assert all(0 <= value < 2**64 for value in hashes)


def test_hash_covers_parent_tokens_and_adapter():
    tokens = list(range(32))
    base = hash_prompt_blocks(tokens, 16)
    assert hash_prompt_blocks(tokens, 16, adapter="sql") != base
    # the same second block after a different first block hashes differently
    other = hash_prompt_blocks([99, *tokens[1:]], 16)
    assert other[0] != base[0] and other[1] != base[1]
    assert hash_prompt_blocks(tokens[:16] + [7] * 16, 16)[0] == base[0]


def test_hashes_are_identical_across_processes():
    code = (
        "from fleetserve.model.kvcache import hash_prompt_blocks;"
        "print(hash_prompt_blocks(list(range(64)), 16, 'adapter-a'))"
    )
    outputs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
        )
        outputs.add(done.stdout.strip())
    assert outputs == {str(hash_prompt_blocks(list(range(64)), 16, "adapter-a"))}


def test_adapter_key_is_zero_for_base_model_and_stable():
    assert adapter_key(None) == 0
    assert adapter_key("a") == adapter_key("a") != adapter_key("b")


def _cache(num_blocks: int = 8) -> KVCacheManager:
    return KVCacheManager(num_blocks, block_size=4)


def test_allocate_and_free_anonymous_blocks():
    kv = _cache()
    assert kv.allocate(5)
    assert kv.num_free_blocks == 3
    assert not kv.allocate(4)  # does not fit: nothing changes
    assert kv.num_free_blocks == 3
    kv.free([], 5)
    assert kv.num_free_blocks == 8 and kv.usage == 0.0


def test_cached_blocks_become_evictable_and_are_found_again():
    kv = _cache()
    hashes = hash_prompt_blocks(list(range(8)), 4)
    assert kv.allocate(2)
    held = kv.cache_blocks(hashes, None, list(range(8)), None)
    assert held == hashes
    (stored,) = kv.take_events()
    assert isinstance(stored, BlockStored)
    assert stored.block_hashes == tuple(hashes) and stored.token_ids == tuple(range(8))
    assert stored.parent_block_hash is None and stored.block_size == 4
    assert kv.count_cached_prefix(hashes, 2) == 2
    kv.free(held, 0)
    assert kv.num_free_blocks == 8  # unreferenced cached blocks count as free
    assert kv.count_cached_prefix(hashes, 2) == 2  # ... and are still findable
    assert all(kv.ref_count(block) == 0 for block in hashes)
    kv.touch(hashes[:1])
    assert kv.ref_count(hashes[0]) == 1 and kv.num_free_blocks == 7


def test_eviction_takes_least_recently_freed_and_a_prompt_tail_first():
    kv = _cache(4)
    first = hash_prompt_blocks(list(range(8)), 4)
    second = hash_prompt_blocks(list(range(100, 108)), 4)
    for hashes, start in ((first, 0), (second, 100)):
        kv.allocate(2)
        kv.free(kv.cache_blocks(hashes, None, list(range(start, start + 8)), None), 0)
    kv.take_events()
    assert kv.allocate(1)
    assert kv.take_events() == [BlockRemoved((first[1],))]  # older prompt, its tail block
    assert kv.allocate(2)
    assert kv.take_events() == [BlockRemoved((first[0], second[1]))]
    assert kv.count_cached_prefix(second, 2) == 1


def test_duplicate_block_stays_anonymous():
    kv = _cache()
    hashes = hash_prompt_blocks(list(range(4)), 4)
    kv.allocate(2)
    assert kv.cache_blocks(hashes, None, list(range(4)), None) == hashes
    assert kv.cache_blocks(hashes, None, list(range(4)), None) == []
    assert kv.ref_count(hashes[0]) == 1


def test_freeing_too_much_is_an_error():
    kv = _cache()
    hashes = hash_prompt_blocks(list(range(4)), 4)
    kv.allocate(1)
    kv.cache_blocks(hashes, None, list(range(4)), None)
    kv.free(hashes, 0)
    with pytest.raises(RuntimeError):
        kv.free(hashes, 0)
    with pytest.raises(RuntimeError):
        kv.free([], 1)


def test_can_allocate_counts_touched_evictable_blocks():
    kv = _cache(3)
    hashes = hash_prompt_blocks(list(range(8)), 4)
    kv.allocate(2)
    kv.free(kv.cache_blocks(hashes, None, list(range(8)), None), 0)
    assert kv.can_allocate(1, hashes)  # 2 touched + 1 new == 3
    assert not kv.can_allocate(2, hashes)


def test_reset_prefix_cache_only_when_idle():
    kv = _cache()
    hashes = hash_prompt_blocks(list(range(4)), 4)
    kv.allocate(1)
    held = kv.cache_blocks(hashes, None, list(range(4)), None)
    kv.take_events()
    assert not kv.reset_prefix_cache()
    kv.free(held, 0)
    assert kv.reset_prefix_cache()
    assert kv.take_events() == [AllBlocksCleared()]
    assert kv.count_cached_prefix(hashes, 1) == 0 and kv.num_free_blocks == 8


def test_prefix_caching_disabled_finds_nothing():
    kv = KVCacheManager(8, 4, enable_prefix_caching=False)
    hashes = hash_prompt_blocks(list(range(4)), 4)
    kv.allocate(1)
    assert kv.cache_blocks(hashes, None, list(range(4)), None) == []
    assert kv.count_cached_prefix(hashes, 1) == 0


def test_unfindable_blocks_are_evicted_in_lru_order_as_one_run():
    kv = _cache(10)
    assert kv.allocate(10)
    hashes = hash_prompt_blocks(list(range(8)), 4)
    kv.free(kv.cache_blocks(hashes, None, list(range(8)), None), 0)  # 2 findable, freed first
    kv.free([], 0, num_unfindable=4)  # a finished unique prompt: 4 cached blocks nobody can find
    assert kv.num_free_blocks == 6 and kv.num_used_blocks == 4
    kv.take_events()
    assert kv.allocate(3)  # evicts the 2 findable blocks (freed first, tail first), then 1 of the run
    assert kv.ref_count(hashes[0]) is None
    assert kv.take_events() == [BlockRemoved((hashes[1], hashes[0]))]
    assert kv.num_free_blocks == 3
    assert kv.allocate(3) and kv.num_free_blocks == 0  # the rest of the run
    assert not kv.allocate(1)
    assert kv.take_events() == []  # unfindable blocks are never reported


def test_private_hashes_name_held_blocks_and_never_collide():
    kv = _cache(10)
    assert kv.allocate(3)
    private = kv.private_hashes(3, num_held=2)
    assert all(value >= 2**64 for value in private) and len(set(private)) == 3
    assert kv.ref_count(private[0]) == kv.ref_count(private[1]) == 1 and kv.ref_count(private[2]) is None
    assert kv.private_hashes(1, 0)[0] not in private
    kv.free(private[:2], 1)
    assert kv.count_cached_prefix(private, 3) == 2  # findable again, e.g. by its preempted request
    assert kv.num_free_blocks == 10


def test_evicting_a_run_bit_by_bit_keeps_the_lru_order():
    """Allocations that take part of the first run in line (the common case once the cache is full of
    finished unique prompts) must evict exactly as if the order were looked at each time."""
    kv = _cache(12)
    assert kv.allocate(12)
    kv.free([], 0, num_unfindable=5)  # first in line
    hashes = hash_prompt_blocks(list(range(8)), 4)
    kv.free(kv.cache_blocks(hashes, None, list(range(8)), None), 0)  # then 2 findable blocks
    kv.free([], 0, num_unfindable=3)  # then another run
    kv.take_events()
    for _ in range(4):  # 4 of the first run's 5 blocks, one at a time
        assert kv.allocate(1)
    assert kv.ref_count(hashes[0]) == 0 and kv.take_events() == []
    assert kv.allocate(2)  # the first run's last block, then the findable tail block
    assert kv.take_events() == [BlockRemoved((hashes[1],))]
    assert kv.allocate(2)  # the other findable block, then the second run
    assert kv.take_events() == [BlockRemoved((hashes[0],))]
    assert kv.num_free_blocks == 2 and kv.allocate(2) and not kv.allocate(1)
    kv.free([], 4)
    assert kv.num_free_blocks == 4


def test_reset_forgets_a_partly_evicted_run():
    kv = _cache(6)
    assert kv.allocate(6)
    kv.free([], 0, num_unfindable=6)
    assert kv.allocate(2)  # the run is now partly evicted
    kv.free([], 2)
    assert kv.reset_prefix_cache()
    assert kv.allocate(6)
    kv.free([], 4, num_unfindable=2)  # a new run, first in line
    assert kv.allocate(5)  # the 4 never-used blocks, then 1 of the new run
    hashes = hash_prompt_blocks(list(range(4)), 4)
    assert kv.allocate(0)
    kv.free(kv.cache_blocks(hashes, None, list(range(4)), None), 0)  # a findable block after the run
    kv.take_events()
    assert kv.allocate(2)  # the new run's last block, then the findable one
    assert kv.take_events() == [BlockRemoved((hashes[0],))]
    assert not kv.allocate(1)
