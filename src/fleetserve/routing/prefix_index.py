"""Which engines hold which prompt-prefix blocks: a bounded block-hash -> engine-set index.

One index serves both modes. In approximate mode the router records its own decisions (`record`); in
precise mode engine KV events add and remove blocks (`add`, `remove`, `clear_engine`, fed by
`KVEventIndexer`). Each entry maps a chained block hash to a bitmask of engine slots, so a lookup walks
the prompt's blocks AND-ing masks (galloping, since each engine holds a prefix), and stops at the first
block no engine holds.

Everything is bounded: `max_entries` and `max_bytes` cap the number of blocks (least recently used goes
first), and `ttl_s` drops blocks nobody has touched for that long.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from fleetserve.errors import InputError

# Measured cost of one entry in CPython 3.11 (two dict slots, the int key, the float timestamp and the
# mask int); benchmarks/prefix_index.py checks it against tracemalloc.
BYTES_PER_ENTRY = 200


@dataclass(frozen=True, slots=True)
class IndexStats:
    entries: int
    engines: int
    approx_bytes: int
    evicted_lru: int
    evicted_ttl: int


class PrefixIndex:
    def __init__(
        self, *, max_entries: int = 1_000_000, max_bytes: int = 256 * 2**20, ttl_s: float = 600.0
    ) -> None:
        if max_entries < 1 or max_bytes < BYTES_PER_ENTRY or ttl_s <= 0:
            raise InputError("prefix index bounds must be positive")
        self.capacity = min(max_entries, max_bytes // BYTES_PER_ENTRY)
        self.ttl_s = ttl_s
        self._masks: dict[int, int] = {}
        # recency order, oldest first. An OrderedDict, not a dict: finding a dict's first key walks over
        # every slot deleted before it, so LRU eviction from a plain dict grows quadratic with churn
        self._touched: OrderedDict[int, float] = OrderedDict()
        self._slot_of: dict[str, int] = {}
        self._engine_of: dict[int, str] = {}
        self._free_slots: list[int] = []
        self._blocks_of_slot: dict[int, int] = {}  # an engine's "tree size", for smallest-tree fallbacks
        self._evicted_lru = 0
        self._evicted_ttl = 0

    # engines -----------------------------------------------------------------------------------------

    def _slot(self, engine_id: str) -> int:
        slot = self._slot_of.get(engine_id)
        if slot is None:
            slot = self._free_slots.pop() if self._free_slots else len(self._slot_of)
            self._slot_of[engine_id] = slot
            self._engine_of[slot] = engine_id
        return slot

    def clear_engine(self, engine_id: str) -> None:
        """Forget every block of `engine_id` (it restarted, cleared its cache, or left the fleet)."""
        slot = self._slot_of.pop(engine_id, None)
        if slot is None:
            return
        del self._engine_of[slot]
        self._free_slots.append(slot)
        keep = ~(1 << slot)
        for block_hash in [h for h, mask in self._masks.items() if mask >> slot & 1]:
            self._set_mask(block_hash, self._masks[block_hash] & keep)
        self._blocks_of_slot.pop(slot, None)

    # updates -----------------------------------------------------------------------------------------

    def record(self, block_hashes: Sequence[int], engine_id: str, now: float) -> None:
        """Approximate mode: `engine_id` was sent these blocks, so it will hold them."""
        self.add(block_hashes, engine_id, now)

    def add(self, block_hashes: Iterable[int], engine_id: str, now: float) -> None:
        slot = self._slot(engine_id)
        bit = 1 << slot
        masks, touched = self._masks, self._touched
        new = 0
        # tail first: the prompt's first block ends up most recently used, so eviction never takes a parent
        # before its child and what an engine holds stays a prefix (which `match` relies on)
        for block_hash in reversed(list(block_hashes)):
            mask = masks.get(block_hash, 0)
            if not mask & bit:
                masks[block_hash] = mask | bit
                new += 1
            touched[block_hash] = now
            touched.move_to_end(block_hash)
        self._blocks_of_slot[slot] = self._blocks_of_slot.get(slot, 0) + new
        self._evict(now)

    def remove(self, block_hashes: Iterable[int], engine_id: str) -> None:
        slot = self._slot_of.get(engine_id)
        if slot is None:
            return
        keep = ~(1 << slot)
        for block_hash in block_hashes:
            mask = self._masks.get(block_hash)
            if mask is not None:
                self._set_mask(block_hash, mask & keep)

    def _set_mask(self, block_hash: int, mask: int) -> None:
        self._forget_bits(self._masks[block_hash] & ~mask)
        if mask:
            self._masks[block_hash] = mask
        else:
            del self._masks[block_hash]
            del self._touched[block_hash]

    def _evict(self, now: float) -> None:
        touched, masks = self._touched, self._masks
        horizon = now - self.ttl_s
        while touched:
            oldest, touched_at = next(iter(touched.items()))
            if len(touched) > self.capacity:
                self._evicted_lru += 1
            elif touched_at < horizon:
                self._evicted_ttl += 1
            else:
                return
            del touched[oldest]
            self._forget_bits(masks.pop(oldest))

    def _forget_bits(self, mask: int) -> None:
        """One block left the engines whose bits are set in `mask`."""
        sizes = self._blocks_of_slot
        while mask:
            low = mask & -mask
            slot = low.bit_length() - 1
            sizes[slot] -= 1
            mask ^= low

    # lookups -----------------------------------------------------------------------------------------

    def match(self, block_hashes: Sequence[int], now: float | None = None) -> dict[str, int]:
        """Engine id -> number of leading blocks of the prompt it holds (engines with none are absent).

        An engine's blocks of one prompt form a prefix of it: `add` ages a prompt's blocks tail first,
        so LRU and TTL eviction take a child before its parent, and engines evict tail first as well. The
        walk relies on that and gallops: it looks up O(log n) blocks per change in the set of engines
        still matching instead of every block, which takes an 8k-token prompt from ~500 lookups to ~20."""
        if now is not None:
            self._evict(now)
        count = len(block_hashes)
        get = self._masks.get
        alive = get(block_hashes[0], 0) if count else 0
        matched: dict[str, int] = {}
        position = 0  # every engine in `alive` holds blocks[0..position]
        while alive:
            # gallop: the last position at which all of `alive` still hold the block
            good, step = position, 1
            probe = position + 1
            while probe < count and get(block_hashes[probe], 0) & alive == alive:
                good, step = probe, step * 2
                probe = good + step
            bad = min(probe, count)  # all of `alive` hold good, not all hold bad (or bad is the end)
            while bad - good > 1:
                middle = (good + bad) // 2
                if get(block_hashes[middle], 0) & alive == alive:
                    good = middle
                else:
                    bad = middle
            if bad == count:
                self._settle(alive, count, matched)
                break
            still = alive & get(block_hashes[bad], 0)
            self._settle(alive & ~still, bad, matched)
            alive, position = still, bad
        return matched

    def _settle(self, mask: int, length: int, matched: dict[str, int]) -> None:
        if length == 0:
            return
        while mask:
            low = mask & -mask
            matched[self._engine_of[low.bit_length() - 1]] = length
            mask ^= low

    def engine_blocks(self, engine_id: str) -> int:
        """How many blocks `engine_id` holds in the index (SGLang's tree size)."""
        slot = self._slot_of.get(engine_id)
        return 0 if slot is None else self._blocks_of_slot.get(slot, 0)

    def engines_holding(self, block_hash: int) -> list[str]:
        mask = self._masks.get(block_hash, 0)
        return [engine for slot, engine in self._engine_of.items() if mask >> slot & 1]

    def stats(self) -> IndexStats:
        return IndexStats(
            entries=len(self._masks),
            engines=len(self._slot_of),
            approx_bytes=len(self._masks) * BYTES_PER_ENTRY,
            evicted_lru=self._evicted_lru,
            evicted_ttl=self._evicted_ttl,
        )

    def __len__(self) -> int:
        return len(self._masks)
