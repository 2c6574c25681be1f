"""A request's prefix blocks, and which engines already hold them.

Block hashes are the engine model's chained hashes (`fleetserve.model.kvcache.hash_prompt_blocks`), so
the router, the simulated engines and the KV-event indexer all name a block the same way. They are
computed once per request, with the block size of the engines that may serve it, and cached on the
`RequestInfo` so every policy (and a retry) reuses them.

`PrefixMatcher` hides the two ways of knowing who holds what:

- precise: the fleet view carries a prefix index fed by the engines' own KV events (the live fleet
  layer's ZMQ subscribers), and the matcher never writes it. An engine reports a prompt's blocks only
  once their prefill has run, so a burst of requests sharing a new prefix would each find no holder and
  scatter; the matcher therefore also remembers where it sent each prompt for `PENDING_TTL_S` (long
  enough for the events to catch up) and counts those blocks as held too;
- approximate: no such index, so the matcher keeps its own, learned from where it sent requests (what
  SGLang's cache_aware router and Dynamo's `--no-kv-events` mode do), bounded in blocks, bytes and age.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from fleetserve.model.kvcache import hash_prompt_blocks
from fleetserve.routing.base import EngineView, FleetView, PrefixLookup, RequestInfo
from fleetserve.routing.prefix_index import PrefixIndex

DEFAULT_BLOCK_SIZE = 16  # vLLM's default, and what engines report when nothing else is known
PENDING_TTL_S = 30.0  # how long a dispatch counts as holding its blocks before the engine's events say so


def request_block_hashes(request: RequestInfo, block_size: int = DEFAULT_BLOCK_SIZE) -> Sequence[int]:
    """The chained hashes of the request's full prompt blocks, computed on first use and cached on the
    request. A request without token ids has none (it can only be routed by load)."""
    hashes = request.block_hashes
    if hashes is None:
        tokens = request.prompt_token_ids
        hashes = [] if tokens is None else hash_prompt_blocks(tokens, block_size, request.adapter)
        request.block_hashes = hashes
    return hashes


def prompt_tokens(request: RequestInfo) -> int:
    """The prompt length in tokens, from the token ids when the caller did not fill `prompt_len`."""
    if request.prompt_len:
        return request.prompt_len
    return len(request.prompt_token_ids) if request.prompt_token_ids is not None else 0


class PrefixMatcher:
    """Per-policy prefix knowledge: the fleet's precise index when the view has one, else an own,
    approximate index that `record` teaches."""

    def __init__(self, *, max_entries: int, max_bytes: int, ttl_s: float) -> None:
        self.own = PrefixIndex(max_entries=max_entries, max_bytes=max_bytes, ttl_s=ttl_s)
        # precise mode: recent dispatches whose blocks the engines may not have reported yet
        self.pending = PrefixIndex(max_entries=max_entries, max_bytes=max_bytes, ttl_s=PENDING_TTL_S)
        self.index: PrefixLookup = self.own
        self.block_size = DEFAULT_BLOCK_SIZE

    @property
    def precise(self) -> bool:
        return self.index is not self.own

    def match(
        self, request: RequestInfo, view: FleetView, candidates: Iterable[EngineView], now: float
    ) -> tuple[Sequence[int], Mapping[str, int]]:
        """The request's block hashes and, per engine, how many leading blocks it holds (engines with
        none are absent). Also fixes the mode and block size the following `record` uses."""
        precise_index = view.prefix_index
        self.index = precise_index if precise_index is not None else self.own
        first = next(iter(candidates), None)
        if first is not None:
            self.block_size = first.block_size or DEFAULT_BLOCK_SIZE
        hashes = request_block_hashes(request, self.block_size)
        if not hashes:
            return hashes, {}
        matched = self.index.match(hashes, now)
        if self.precise:
            for engine_id, blocks in self.pending.match(hashes, now).items():
                if blocks > matched.get(engine_id, 0):
                    matched[engine_id] = blocks
        return hashes, matched

    def record(self, request: RequestInfo, engine_id: str, now: float) -> None:
        """`engine_id` got the request, so (approximately) it will hold its prefix. In precise mode the
        engine's own events will say so, and writing into their index would corrupt it: the dispatch goes
        to the short-lived pending index instead."""
        hashes = request_block_hashes(request, self.block_size)
        if hashes:
            (self.pending if self.precise else self.own).record(hashes, engine_id, now)

    def sent_blocks(self, engine_id: str) -> int:
        """Blocks this policy has sent to the engine: its whole record in approximate mode (SGLang's tree
        size), its last `PENDING_TTL_S` in precise mode. A proxy of what the policy has loaded the engine
        with; the precise index's own size would not do, as it follows each engine's KV capacity."""
        return (self.pending if self.precise else self.own).engine_blocks(engine_id)
