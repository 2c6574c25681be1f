"""DualMap: two hash-chosen candidates per prompt prefix, then cache affinity unless the SLO or a hotspot
says otherwise (DualMap: Enabling Both Cache Affinity and Load Balancing for Distributed LLM Serving,
arXiv 2602.06502, ICLR 2026).

Each request's prefix key (the chained hash of its first `prefix_blocks` blocks past the fleet-wide
common prefix, so it covers exactly that prefix) goes through two independent hash functions onto two
consistent-hash rings with virtual nodes; each ring names one candidate. Requests sharing a prefix always
get the same pair, so they meet their cache on one of two engines, while distinct prefixes spread like
the power of two choices. Adding or removing an engine moves only the keys on the arcs its virtual nodes
owned.

The fleet-wide common prefix ends at the prompt's deepest block after which recent prompts went on in
`common_fanout` different ways: a system prompt that many conversations start with. It says nothing
about where a request belongs, and keying on it would send every request to the same two engines (the
Mooncake trace starts every prompt with the same 512 tokens), so the key starts after it. Branching is
the signal, not how many requests or engines hold a block: the turns of one conversation extend each
other, so its own blocks never branch and its key stays put, while a system prompt branches as soon as
a few conversations have started with it.

Between the two: the one holding more of the prefix (the cache-affinity candidate), or the less loaded
when neither holds more. The paper then migrates queued requests off hotspots to their other candidate;
a router cannot move queued work, so it does the next best thing at admission: it diverts to the other
candidate when the affinity candidate's predicted TTFT breaks the request's SLO, or when its load stands
far above the fleet's mean.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import itertools
import random
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence

from fleetserve.errors import InputError
from fleetserve.routing.base import Decision, EngineView, FleetView, Policy, RequestInfo, require_candidates
from fleetserve.routing.cache_aware import DEFAULT_MAX_BLOCKS, DEFAULT_MAX_BYTES, DEFAULT_TTL_S
from fleetserve.routing.prefix import PrefixMatcher, prompt_tokens
from fleetserve.routing.shared import idle_instead

_MASK64 = (1 << 64) - 1
# Two arbitrary odd constants make the two hash functions independent of each other.
_SALT_PRIMARY = 0x5851F42D4C957F2D
_SALT_SECONDARY = 0x14057B7EF767814F
_RING_CACHE_SIZE = 32  # candidate sets differ per model, adapter and health state; keep the recent ones
_BRANCHING_ENTRIES = 100_000  # blocks whose followers are kept, most recently seen first
_SCANNED_BLOCKS = 256  # a common prefix (a system prompt) is looked for in the first 4k tokens at 16


def mix64(value: int) -> int:
    """SplitMix64's finaliser: a fast bijective scramble of a 64-bit integer."""
    value = (value ^ (value >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    value = (value ^ (value >> 27)) * 0x94D049BB133111EB & _MASK64
    return value ^ (value >> 31)


def stable_hash(text: str) -> int:
    """A 64-bit hash of a string that is the same in every process (str hashes are salted)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


@functools.lru_cache(maxsize=4096)
def _ring_points(name: str, engine_id: str, virtual_nodes: int) -> tuple[int, ...]:
    return tuple(stable_hash(f"{name}/{engine_id}#{i}") for i in range(virtual_nodes))


class PrefixBranching:
    """Where prompts branch: for each recently seen block (bounded, least recently seen forgotten first),
    the distinct blocks that followed it, up to `fanout`. A block followed by `fanout` different blocks
    ends a prefix that many different requests share."""

    def __init__(self, fanout: int, max_entries: int) -> None:
        self.fanout = fanout
        self.max_entries = max_entries
        self._children: OrderedDict[int, set[int]] = OrderedDict()

    def common_blocks(self, block_hashes: Sequence[int]) -> int:
        """The length of the prompt's prefix up to its deepest block that `fanout` continuations share
        (0 when there is none), among its first `_SCANNED_BLOCKS` blocks."""
        children, fanout = self._children, self.fanout
        common = 0
        for depth, block_hash in enumerate(block_hashes[:_SCANNED_BLOCKS], 1):
            followers = children.get(block_hash)
            if followers is None:  # no prompt seen went on past this block, so none went deeper
                break
            if len(followers) >= fanout:
                common = depth
        return common

    def record(self, block_hashes: Sequence[int]) -> None:
        """Note which block followed which among the prompt's first `_SCANNED_BLOCKS` + 1."""
        children, fanout = self._children, self.fanout
        for parent, child in itertools.pairwise(block_hashes[: _SCANNED_BLOCKS + 1]):
            followers = children.get(parent)
            if followers is None:
                followers = children[parent] = set()
            else:
                children.move_to_end(parent)
            if len(followers) < fanout:
                followers.add(child)
        while len(children) > self.max_entries:
            children.popitem(last=False)


class HashRing:
    """A consistent-hash ring: each engine owns `virtual_nodes` points (times its weight, when `engines`
    maps ids to weights), a key belongs to the first point at or after it (clockwise). Point positions
    depend only on the engine id and the ring's name, so a weight change moves only that engine's arcs."""

    def __init__(self, engines: Iterable[str] | Mapping[str, float], name: str, virtual_nodes: int) -> None:
        weights = engines if isinstance(engines, Mapping) else dict.fromkeys(engines, 1.0)
        points = sorted(
            (position, engine_id)
            for engine_id, weight in weights.items()
            for position in _ring_points(name, engine_id, max(1, round(virtual_nodes * weight)))
        )
        if not points:
            raise InputError("a hash ring needs at least one engine")
        self._positions = [position for position, _ in points]
        self._owners = [owner for _, owner in points]

    def owner(self, key: int) -> str:
        return self._owners[bisect.bisect_left(self._positions, key) % len(self._owners)]

    def walk(self, key: int) -> Iterator[str]:
        """Owners clockwise from `key`, starting with its owner (repeats included)."""
        start = bisect.bisect_left(self._positions, key)
        owners = self._owners
        for offset in range(len(owners)):
            yield owners[(start + offset) % len(owners)]


class DualMapPolicy(Policy):
    name = "dualmap"

    def __init__(
        self,
        *,
        prefix_blocks: int = 8,
        virtual_nodes: int = 128,
        ttft_slo_ms: float | None = None,
        hotspot_factor: float = 2.0,
        hotspot_min_load: float = 4.0,
        common_fanout: int = 3,
        max_tree_size: int = DEFAULT_MAX_BLOCKS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        ttl_s: float = DEFAULT_TTL_S,
        seed: int | None = None,
    ) -> None:
        """`ttft_slo_ms` applies to requests that carry no SLO of their own; `hotspot_factor` and
        `hotspot_min_load` define a hotspot: normalised load above both the factor times the candidates'
        mean and the minimum; a block that prompts went on from in `common_fanout` different ways ends the
        fleet's common prefix, and the prefix key starts after it."""
        if prefix_blocks < 1 or virtual_nodes < 1:
            raise InputError("prefix_blocks and virtual_nodes must be >= 1")
        if hotspot_factor <= 1.0:
            raise InputError(f"hotspot_factor must be > 1, got {hotspot_factor}")
        if common_fanout < 2:
            raise InputError(f"common_fanout must be >= 2, got {common_fanout}")
        self.prefix_blocks = prefix_blocks
        self.virtual_nodes = virtual_nodes
        self.ttft_slo_ms = ttft_slo_ms
        self.hotspot_factor = hotspot_factor
        self.hotspot_min_load = hotspot_min_load
        self.branching = PrefixBranching(common_fanout, max_entries=min(max_tree_size, _BRANCHING_ENTRIES))
        self.prefixes = PrefixMatcher(max_entries=max_tree_size, max_bytes=max_bytes, ttl_s=ttl_s)
        self._rings: OrderedDict[frozenset[str], tuple[HashRing, HashRing]] = OrderedDict()
        self._rng = random.Random(seed)  # only to pick among identical idle engines

    def rings(self, engines: Iterable[str] | Mapping[str, float]) -> tuple[HashRing, HashRing]:
        """The primary and secondary rings over exactly these engines, weighted when given a mapping of
        engine id to capacity (cached per engine set and weights)."""
        weights = dict(engines) if isinstance(engines, Mapping) else dict.fromkeys(engines, 1.0)
        members = frozenset(weights.items())
        rings = self._rings.get(members)
        if rings is None:
            rings = (
                HashRing(weights, "primary", self.virtual_nodes),
                HashRing(weights, "secondary", self.virtual_nodes),
            )
            self._rings[members] = rings
            if len(self._rings) > _RING_CACHE_SIZE:
                self._rings.popitem(last=False)
        else:
            self._rings.move_to_end(members)
        return rings

    def prefix_key(self, request: RequestInfo, common_blocks: int = 0) -> int:
        """What identifies the request's prefix: the chained hash of its `prefix_blocks`-th block after
        the `common_blocks` the fleet shares (or of its last full one); for a prompt shorter than a block
        its tokens; without tokens its session, so a conversation still sticks; failing all, its id,
        which just spreads requests."""
        hashes = request.block_hashes
        if hashes:
            return hashes[min(common_blocks + self.prefix_blocks, len(hashes)) - 1]
        if request.prompt_token_ids:
            return hash(tuple(request.prompt_token_ids)) & _MASK64
        return stable_hash(request.session if request.session is not None else request.request_id)

    def pair(
        self, request: RequestInfo, engines: Iterable[str] | Mapping[str, float], common_blocks: int = 0
    ) -> tuple[str, str]:
        """The request's two candidates (the same engine twice only when there is one engine)."""
        primary_ring, secondary_ring = self.rings(engines)
        key = self.prefix_key(request, common_blocks)
        primary = primary_ring.owner(mix64(key ^ _SALT_PRIMARY))
        secondary = primary
        for owner in secondary_ring.walk(mix64(key ^ _SALT_SECONDARY)):
            if owner != primary:
                secondary = owner
                break
        return primary, secondary

    def choose(self, request: RequestInfo, view: FleetView, now: float) -> Decision:
        candidates = require_candidates(request, view)
        _, matched = self.prefixes.match(request, view, candidates, now)  # also fills request.block_hashes
        if len(candidates) == 1:
            return Decision(candidates[0].engine_id, "only_candidate")
        by_id = {engine.engine_id: engine for engine in candidates}
        hashes = request.block_hashes or ()
        common = self.branching.common_blocks(hashes)
        self.branching.record(hashes)
        # rings weighted by capacity: on a mixed fleet an H100 owns more keys than an L4, as it should
        capacities = {engine_id: engine.capacity for engine_id, engine in by_id.items()}
        first_id, second_id = self.pair(request, capacities, common)
        first, second = by_id[first_id], by_id[second_id]
        first_blocks, second_blocks = matched.get(first_id, 0), matched.get(second_id, 0)
        if first_blocks != second_blocks:
            preferred, other = (first, second) if first_blocks > second_blocks else (second, first)
            reason = "cache_affinity"
        else:
            lighter = second.normalized_load < first.normalized_load
            preferred, other = (second, first) if lighter else (first, second)
            reason = "power_of_two"
        less_loaded = other if other.normalized_load < preferred.normalized_load else preferred

        if self._breaks_slo(request, preferred, matched.get(preferred.engine_id, 0)):
            preferred, reason = less_loaded, "slo_fallback"
        elif less_loaded is other and self._is_hotspot(preferred, candidates):
            preferred, reason = other, "hotspot"
        idle = idle_instead(preferred, candidates, self._rng)
        return (
            Decision(preferred.engine_id, reason) if idle is None else Decision(idle.engine_id, "idle_engine")
        )

    def _breaks_slo(self, request: RequestInfo, engine: EngineView, cached_blocks: int) -> bool:
        slo_ms = request.ttft_slo_ms if request.ttft_slo_ms is not None else self.ttft_slo_ms
        if slo_ms is None or engine.predictor is None:
            return False
        cached_tokens = cached_blocks * self.prefixes.block_size
        return engine.predictor(prompt_tokens(request), cached_tokens) * 1000.0 > slo_ms

    def _is_hotspot(self, engine: EngineView, candidates: list[EngineView]) -> bool:
        load = engine.normalized_load
        if load < self.hotspot_min_load:
            return False
        mean = sum(e.normalized_load for e in candidates) / len(candidates)
        return load > self.hotspot_factor * mean

    def on_dispatch(self, request: RequestInfo, engine_id: str, now: float) -> None:
        self.prefixes.record(request, engine_id, now)
