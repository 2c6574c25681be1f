"""Paged KV cache: a pool of fixed-size blocks, automatic prefix caching and the KV events it emits.

Modelled on vLLM v1's BlockPool and KVCacheManager, reduced to what a performance model needs:

- A block is either *anonymous* (holds KV nobody can look up: a partial prompt block or generated
  tokens) or *cached* (a full prompt block, findable by its chained hash). Only cached blocks need an
  identity, so anonymous blocks are a count, which keeps decode growth O(1) per block.
- Cached blocks are reference counted. One whose count drops to zero stays findable but becomes
  evictable; evictable blocks are reused least-recently-freed first (vLLM's free block queue).
- Every cached block that appears or disappears produces a `BlockStored` / `BlockRemoved` event in
  vLLM's vocabulary, so a router can mirror the cache.
- A *unique* prompt (the caller promises no other request shares any of its blocks, e.g. a trace
  request without `hash_ids`) needs no hashes: while its request holds them its full blocks are a
  count, and when it finishes they join the eviction order as one `_UnfindableRun`, since nobody can
  ever look them up again. That makes a unique prompt O(1) to cache, free and evict, with the same block
  accounting and eviction order as hashing it. (A preempted request may find its own blocks again, so
  the scheduler gives a preempted unique prompt real hashes first, see `private_hashes`.) Unique
  prompts' blocks are never reported in KV events: no router could match them.

A block hash covers the parent block's hash, the block's token ids and the LoRA adapter, so equal
hashes mean equal prefixes. Hashes are 64-bit and deterministic across processes: CPython hashes ints
and tuples of ints without the per-process salt it applies to str and bytes, and the adapter name is
folded in through blake2b.
"""

from __future__ import annotations

import functools
import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from fleetserve.errors import InputError, InternalError
from fleetserve.model.types import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

_MASK64 = (1 << 64) - 1
_ROOT = 0x9E3779B97F4A7C15  # stands in for the missing parent of a prompt's first block
# hashes handed out by `private_hashes` start above every 64-bit prompt hash, so they never collide
_PRIVATE_BASE = 1 << 64


@functools.lru_cache(maxsize=4096)
def adapter_key(adapter: str | None) -> int:
    """A stable 63-bit id for an adapter name (0 for the base model); also used as vLLM's lora_id."""
    if adapter is None:
        return 0
    digest = hashlib.blake2b(adapter.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def hash_block_tokens(parent_hash: int | None, token_ids: Sequence[int], adapter: str | None = None) -> int:
    """The hash of one full block, chained from its parent's hash."""
    parent = _ROOT if parent_hash is None else parent_hash
    return hash((parent, adapter_key(adapter), tuple(token_ids))) & _MASK64


def hash_prompt_blocks(token_ids: Sequence[int], block_size: int, adapter: str | None = None) -> list[int]:
    """Chained hashes of the prompt's full blocks (a trailing partial block has none)."""
    tokens = tuple(token_ids)  # slicing a tuple yields the hashable block without another copy
    lora = adapter_key(adapter)
    hashes: list[int] = []
    append = hashes.append
    parent = _ROOT
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hash((parent, lora, tokens[start : start + block_size])) & _MASK64
        append(parent)
    return hashes


class _UnfindableRun:
    """Consecutive evictable blocks nobody can look up (a finished unique prompt's): one entry of the
    eviction order instead of one per block. Identity-hashed, so each run is its own key."""

    __slots__ = ("count",)

    def __init__(self, count: int) -> None:
        self.count = count


@dataclass
class PrefixCacheStats:
    """Prefix-cache lookups in tokens, as vLLM counts them (queries = tokens looked up)."""

    queries: int = 0
    hits: int = 0


class KVCacheManager:
    """Which blocks hold what. Knows nothing about scheduling or time.

    Callers own their block tables: a table is the list of cached block hashes a request holds a
    reference on plus a count of anonymous blocks, and the caller hands both back on `free`.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        enable_events: bool = True,
    ) -> None:
        if num_blocks < 1:
            raise InputError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.enable_events = enable_events
        self.stats = PrefixCacheStats()
        self._num_uncached_free = num_blocks
        self._ref_counts: dict[int, int] = {}  # cached block hash -> requests holding it
        # cached, unreferenced blocks, least recently freed first: hashes and runs of unfindable blocks
        self._evictable: OrderedDict[int | _UnfindableRun, None] = OrderedDict()
        self._num_evictable = 0  # blocks in _evictable (a run counts its blocks)
        self._num_private = 0  # private hashes handed out so far
        # the run first in the eviction order when the last eviction took only part of it: the next
        # eviction usually takes from it again and needs no look at the order (nothing is ever put
        # in front of it, and only an eviction or a reset removes it)
        self._partial_run: _UnfindableRun | None = None
        self._events: list[KVEvent] = []

    # ---- pool state -------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation may take: never used, or cached but unreferenced (evictable)."""
        return self._num_uncached_free + self._num_evictable

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        # num_used_blocks / num_blocks, spelled out: the simulator reads this for every engine it syncs
        return (self.num_blocks - self._num_uncached_free - self._num_evictable) / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._ref_counts)

    def ref_count(self, block_hash: int) -> int | None:
        """A cached block's reference count, or None when the hash is not cached."""
        return self._ref_counts.get(block_hash)

    def cached_ref_counts(self) -> dict[int, int]:
        return dict(self._ref_counts)

    def private_hashes(self, count: int, num_held: int) -> list[int]:
        """`count` fresh hashes no prompt hash can equal, identities for a unique prompt's blocks once its
        request may look them up again (after a preemption). The first `num_held` name blocks the caller
        holds as unfindable ones; they become cached blocks it holds a reference on."""
        start = _PRIVATE_BASE + self._num_private
        self._num_private += count
        hashes = list(range(start, start + count))
        self._ref_counts.update(dict.fromkeys(hashes[:num_held], 1))
        return hashes

    @property
    def has_events(self) -> bool:
        return bool(self._events)

    def take_events(self) -> list[KVEvent]:
        events, self._events = self._events, []
        return events

    # ---- prefix lookup ----------------------------------------------------------------------------

    def count_cached_prefix(self, block_hashes: Sequence[int], max_blocks: int) -> int:
        """How many of the leading `block_hashes` (at most `max_blocks`) are cached."""
        if not self.enable_prefix_caching:
            return 0
        ref_counts = self._ref_counts
        hits = 0
        for block_hash in block_hashes[:max_blocks]:
            if block_hash not in ref_counts:
                break
            hits += 1
        return hits

    def record_lookup(self, query_tokens: int, hit_tokens: int) -> None:
        if self.enable_prefix_caching:
            self.stats.queries += query_tokens
            self.stats.hits += hit_tokens

    def num_evictable_among(self, block_hashes: Sequence[int]) -> int:
        """How many of these cached blocks are unreferenced, so touching them uses up free blocks."""
        return sum(1 for block_hash in block_hashes if self._ref_counts[block_hash] == 0)

    # ---- allocation -------------------------------------------------------------------------------

    def can_allocate(self, num_new_blocks: int, touched: Sequence[int] = ()) -> bool:
        """Whether `num_new_blocks` fresh blocks fit after touching the cached `touched` blocks."""
        touched_free = self.num_evictable_among(touched) if touched else 0
        return num_new_blocks + touched_free <= self._num_uncached_free + self._num_evictable

    def touch(self, block_hashes: Sequence[int]) -> None:
        """Take a reference on cached blocks (a prefix hit); unreferenced ones stop being evictable."""
        ref_counts, evictable = self._ref_counts, self._evictable
        for block_hash in block_hashes:
            count = ref_counts[block_hash]
            if count == 0:
                del evictable[block_hash]
                self._num_evictable -= 1
            ref_counts[block_hash] = count + 1

    def allocate(self, num_blocks: int) -> bool:
        """Take `num_blocks` anonymous blocks, evicting least-recently-freed cached blocks if needed.
        Returns False, changing nothing, when they do not fit."""
        if num_blocks <= 0:
            return num_blocks == 0
        uncached = self._num_uncached_free
        if num_blocks <= uncached:
            self._num_uncached_free = uncached - num_blocks
            return True
        if num_blocks > uncached + self._num_evictable:
            return False
        # every never-used block, then evicted ones for the rest
        self._num_uncached_free = 0
        to_evict = num_blocks - uncached
        run = self._partial_run
        if run is not None and run.count > to_evict:
            run.count -= to_evict
            self._num_evictable -= to_evict
        else:
            self._evict(to_evict)
        return True

    def _evict(self, count: int) -> None:
        evictable, ref_counts = self._evictable, self._ref_counts
        self._num_evictable -= count
        self._partial_run = None
        evicted = []
        while count:
            key = next(iter(evictable))
            if type(key) is _UnfindableRun:
                if key.count > count:  # the rest of the run stays first in line
                    key.count -= count
                    self._partial_run = key
                    break
                count -= key.count
                del evictable[key]
                continue
            del evictable[key]
            del ref_counts[key]
            count -= 1
            if key < _PRIVATE_BASE:
                evicted.append(key)
        if evicted and self.enable_events:
            self._events.append(BlockRemoved(tuple(evicted)))

    def cache_blocks(
        self,
        block_hashes: Sequence[int],
        parent_hash: int | None,
        token_ids: Sequence[int],
        adapter: str | None,
        report: bool = True,
    ) -> list[int]:
        """Turn just-computed anonymous full blocks into cached ones (the caller already holds them).

        Returns the hashes the caller now holds a reference on. A hash that is already cached (another
        request computed the same block concurrently) stays anonymous, as vLLM keeps such duplicates
        out of the lookup table. `report=False` emits no event (blocks no router could match)."""
        if not self.enable_prefix_caching or not block_hashes:
            return []
        ref_counts = self._ref_counts
        stored = [block_hash for block_hash in block_hashes if block_hash not in ref_counts]
        for block_hash in stored:
            ref_counts[block_hash] = 1
        if stored and report and self.enable_events:
            # A duplicate in the middle breaks the chain a reader would rebuild, so report the whole
            # run with its parent; readers treat an already-known hash as a no-op.
            self._events.append(
                BlockStored(
                    block_hashes=tuple(block_hashes),
                    parent_block_hash=parent_hash,
                    token_ids=tuple(token_ids),
                    block_size=self.block_size,
                    lora_id=adapter_key(adapter) if adapter else None,
                    lora_name=adapter,
                )
            )
        return stored

    def free(self, cached_hashes: Sequence[int], num_anonymous: int, num_unfindable: int = 0) -> None:
        """Give back a request's blocks. Cached ones are released tail first, so a prompt's last blocks
        are evicted before its first ones (which more requests share). `num_unfindable` more blocks are
        cached but can never be looked up again (a finished unique prompt's): they join the eviction
        order as one run, after the cached ones."""
        if num_anonymous < 0 or num_unfindable < 0:
            raise InputError(f"cannot free a negative number of blocks ({num_anonymous}, {num_unfindable})")
        ref_counts, evictable = self._ref_counts, self._evictable
        released = 0
        for block_hash in reversed(cached_hashes):
            count = ref_counts[block_hash] - 1
            ref_counts[block_hash] = count
            if not count:
                evictable[block_hash] = None
                released += 1
            elif count < 0:
                raise InternalError(f"block {block_hash:#x} freed more often than referenced")
        if num_unfindable:
            evictable[_UnfindableRun(num_unfindable)] = None
            released += num_unfindable
        self._num_evictable += released
        self._num_uncached_free += num_anonymous
        if self._num_uncached_free + self._num_evictable > self.num_blocks:
            raise InternalError("more KV blocks freed than allocated")

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block; only possible when no request holds a block (as in vLLM)."""
        if self.num_free_blocks != self.num_blocks:
            return False
        self._num_uncached_free = self.num_blocks
        self._ref_counts.clear()
        self._evictable.clear()
        self._partial_run = None
        self._num_evictable = 0
        if self.enable_events:
            self._events.append(AllBlocksCleared())
        return True
