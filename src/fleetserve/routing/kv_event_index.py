"""Precise mode of the prefix index: keep it in step with engines' own KV events.

Engines hash blocks their own way (vLLM's hashes depend on its version and settings), so the indexer
re-hashes each stored block's token ids with fleetserve's chained hash, the one the router computes for
prompts, and remembers the engine's hash for each so a later BlockRemoved can be undone. Sequence numbers
come with every batch: a gap means events were lost, and the caller either replays the missing batches
or resets the engine's entries (`reset_engine`).
"""

from __future__ import annotations

from collections.abc import Iterable

from fleetserve.model.kvcache import hash_block_tokens
from fleetserve.model.types import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from fleetserve.routing.prefix_index import PrefixIndex


class KVEventIndexer:
    def __init__(self, index: PrefixIndex, *, max_blocks_per_engine: int = 1_000_000) -> None:
        self.index = index
        self.max_blocks_per_engine = max_blocks_per_engine
        self._ours: dict[str, dict[int, int]] = {}  # engine -> engine block hash -> our block hash
        self._next_seq: dict[str, int] = {}

    def expected_seq(self, engine_id: str) -> int | None:
        return self._next_seq.get(engine_id)

    def apply_batch(self, engine_id: str, seq: int, events: Iterable[KVEvent], now: float) -> bool:
        """Apply one batch. Returns False, applying nothing, when `seq` skips ahead of the next expected
        number: the caller must replay from `expected_seq` or call `reset_engine`. Old duplicates (a
        replay overlapping what already arrived) are ignored."""
        expected = self._next_seq.get(engine_id)
        if expected is not None and seq < expected:
            return True
        if expected is not None and seq > expected:
            return False
        for event in events:
            self.apply(engine_id, event, now)
        self._next_seq[engine_id] = seq + 1
        return True

    def apply(self, engine_id: str, event: KVEvent, now: float) -> None:
        ours = self._ours.setdefault(engine_id, {})
        if isinstance(event, BlockStored):
            parent = ours.get(event.parent_block_hash) if event.parent_block_hash is not None else None
            stored = []
            size = event.block_size
            for position, engine_hash in enumerate(event.block_hashes):
                tokens = event.token_ids[position * size : (position + 1) * size]
                parent = hash_block_tokens(parent, tokens, event.lora_name)
                ours.pop(engine_hash, None)
                ours[engine_hash] = parent
                stored.append(parent)
            self.index.add(stored, engine_id, now)
            while len(ours) > self.max_blocks_per_engine:
                del ours[next(iter(ours))]
        elif isinstance(event, BlockRemoved):
            removed = [ours.pop(h) for h in event.block_hashes if h in ours]
            self.index.remove(removed, engine_id)
        elif isinstance(event, AllBlocksCleared):
            self.reset_engine(engine_id, keep_sequence=True)

    def reset_engine(self, engine_id: str, *, keep_sequence: bool = False) -> None:
        """Forget what `engine_id` holds; with keep_sequence False the next batch is accepted as is."""
        self.index.clear_engine(engine_id)
        self._ours.pop(engine_id, None)
        if not keep_sequence:
            self._next_seq.pop(engine_id, None)
