"""Which running requests to move, from which engine to which: Llumnix's pairing with a load that means
the same on every GPU.

Llumnix (Sun et al., OSDI'24) pairs the most loaded instance with the least loaded one and moves a
decoding request between them, with load measured as *freeness*: free KV blocks per running request. On
a heterogeneous fleet that number does not compare engines: an L4 and an H100 with the same free blocks
per request drain at very different speeds. The `drain_time` policy measures load as the engine model's
predicted time to finish everything the engine holds, on its GPU, and moves a request only when the
cost model says it finishes sooner elsewhere, KV copy (or recompute) and the destination's queue
included. `freeness` is Llumnix's own metric and rule, kept as the baseline.

Both, and Llumnix's priority rule: an engine whose next request to admit is more urgent than requests it
runs, and does not fit in its free blocks, moves those out of its way (least urgent first, then the
shortest context) to the engines with room, instead of letting the urgent request wait (reason
`priority`).

Both: engines of one model only; pairs (most loaded, least loaded), (second, second-least), ...; a move
only if the gap between the two shrinks without flipping; decoding requests with the shortest context
first (the cheapest to copy); an engine being drained is a source whatever its load, so scale-in moves
its requests out instead of waiting for them. Pure: snapshots in, moves out; the simulator and the live
fleet build the snapshots from what they know.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from fleetserve.errors import InputError
from fleetserve.model.cost import CostModel
from fleetserve.model.engine import EngineModel
from fleetserve.model.migration import StagedCopy, staged_copy
from fleetserve.model.scheduler import cdiv
from fleetserve.model.types import DecodingRequest

MigrationPolicy = Literal["drain_time", "freeness"]
MIGRATION_POLICIES: tuple[str, ...] = ("drain_time", "freeness")


@dataclass(frozen=True, slots=True)
class WaitingHead:
    """The request an engine admits next: its priority (lower is more urgent) and the blocks it needs."""

    priority: int
    blocks: int


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """One engine as the controller sees it."""

    engine_id: str
    model: str
    cost: CostModel
    block_size: int
    free_blocks: int
    total_blocks: int
    waiting_prompt_tokens: int  # prompts queued and not yet prefilled
    waiting_blocks: int  # what the queued prompts will need
    waiting_output_tokens: int
    decoding: tuple[DecodingRequest, ...]
    draining: bool = False
    max_num_seqs: int = 256
    waiting_head: WaitingHead | None = None

    @property
    def batch(self) -> int:
        return len(self.decoding)

    def decode_step_s(self, extra: int = 0) -> float:
        """One decode iteration of the running batch (plus `extra` requests of average context)."""
        count = self.batch + extra
        if count <= 0:
            return self.cost.decode_time(1, 1)
        context = sum(request.context_tokens for request in self.decoding)
        mean = context / self.batch if self.batch else 1
        return self.cost.decode_time(count, int(context + extra * mean))

    def drain_s(self) -> float:
        """Predicted seconds to finish everything on the engine at its current batch efficiency: the
        queued prompts' prefill, then every token left, decoded in batches as large as it can run."""
        tokens = sum(request.tokens_left for request in self.decoding) + self.waiting_output_tokens
        if not tokens and not self.waiting_prompt_tokens:
            return 0.0
        queued = 1 if self.waiting_output_tokens else 0
        width = max(1, min(self.max_num_seqs, self.batch + queued))
        prefill = (
            self.cost.iteration_time([(self.waiting_prompt_tokens, 0)], [])
            if self.waiting_prompt_tokens
            else 0
        )
        return prefill + tokens * self.decode_step_s(width - self.batch) / width

    def to_wire(self) -> dict[str, object]:
        """What an engine's `GET /fleetserve/load` answers: everything but what the gateway knows
        itself (the engine's id, model and cost model)."""
        return {
            "block_size": self.block_size,
            "free_blocks": self.free_blocks,
            "total_blocks": self.total_blocks,
            "waiting_prompt_tokens": self.waiting_prompt_tokens,
            "waiting_blocks": self.waiting_blocks,
            "waiting_output_tokens": self.waiting_output_tokens,
            "max_num_seqs": self.max_num_seqs,
            "decoding": [[r.request_id, r.context_tokens, r.tokens_left, r.priority] for r in self.decoding],
            "waiting_head": None
            if self.waiting_head is None
            else [self.waiting_head.priority, self.waiting_head.blocks],
        }

    @classmethod
    def from_wire(
        cls,
        engine_id: str,
        model: str,
        cost: CostModel,
        wire: Mapping[str, Any],
        *,
        draining: bool = False,
        movable: Callable[[str], bool] = lambda request_id: True,
    ) -> EngineLoad:
        """The inverse of `to_wire`; `movable(request_id)` says which decoding requests may be moved.
        Raises InputError on a malformed answer."""
        try:
            decoding = tuple(
                DecodingRequest(str(rid), int(context), int(left), movable(str(rid)), int(priority))
                for rid, context, left, priority in wire["decoding"]
            )
            head = wire["waiting_head"]
            waiting_head = None if head is None else WaitingHead(int(head[0]), int(head[1]))
            return cls(
                engine_id,
                model,
                cost,
                int(wire["block_size"]),
                int(wire["free_blocks"]),
                int(wire["total_blocks"]),
                int(wire["waiting_prompt_tokens"]),
                int(wire["waiting_blocks"]),
                int(wire["waiting_output_tokens"]),
                decoding,
                draining,
                int(wire["max_num_seqs"]),
                waiting_head,
            )
        except (KeyError, TypeError, ValueError) as error:
            raise InputError(f"engine {engine_id} sent a malformed load: {error!r}") from None

    def freeness(self) -> float:
        """Llumnix: free blocks, less what the queue needs, per running request."""
        return (self.free_blocks - self.waiting_blocks) / max(1, self.batch)

    def without(self, request: DecodingRequest) -> EngineLoad:
        blocks = cdiv(request.context_tokens, self.block_size)
        decoding = tuple(other for other in self.decoding if other.request_id != request.request_id)
        return replace(self, decoding=decoding, free_blocks=self.free_blocks + blocks)

    def with_request(self, request: DecodingRequest) -> EngineLoad:
        blocks = cdiv(request.context_tokens, self.block_size)
        return replace(self, decoding=(*self.decoding, request), free_blocks=self.free_blocks - blocks)


def engine_load(engine_id: str, model: str, engine: EngineModel, *, draining: bool = False) -> EngineLoad:
    """The controller's snapshot of an engine of the engine model (the simulator's, or an emulated
    engine's)."""
    scheduler, kv = engine.scheduler, engine.kv
    waiting = list(scheduler.waiting)
    head = scheduler.waiting.peek() if waiting else None
    return EngineLoad(
        engine_id,
        model,
        engine.cost,
        kv.block_size,
        kv.num_free_blocks,
        kv.num_blocks,
        sum(seq.num_tokens - seq.num_computed for seq in waiting)
        + sum(seq.num_tokens - seq.num_computed for seq in scheduler.prefilling.values()),
        sum(cdiv(seq.num_tokens, kv.block_size) for seq in waiting),
        sum(seq.output_len - seq.num_output for seq in waiting),
        tuple(engine.decoding()),
        draining,
        engine.config.max_num_seqs,
        None if head is None else WaitingHead(head.priority, cdiv(head.num_tokens, kv.block_size)),
    )


@dataclass(frozen=True, slots=True)
class Move:
    request_id: str
    source: str
    destination: str
    reason: str  # "load", "drain" or "priority"
    copy: StagedCopy | None  # None: by recompute
    context_tokens: int


@dataclass
class MigrationController:
    """`decide(loads)` -> the moves to start now. `kv`: engines move KV (emulated engines, the
    simulator); False: the destination recomputes the context (llama.cpp, vLLM without a connector)."""

    policy: MigrationPolicy = "drain_time"
    kv: bool = True
    max_moves: int = 4  # per decision, over the whole fleet
    min_gap_s: float = 0.5  # drain_time: engines closer than this are balanced enough
    min_freeness_gap: float = 16.0  # freeness: blocks per request
    make_room: bool = True  # the priority rule
    _moving: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.policy not in MIGRATION_POLICIES:
            raise InputError(
                f"unknown migration policy {self.policy!r}; valid: {', '.join(MIGRATION_POLICIES)}"
            )

    def decide(self, loads: Iterable[EngineLoad]) -> list[Move]:
        by_model: dict[str, list[EngineLoad]] = defaultdict(list)
        for load in loads:
            by_model[load.model].append(load)
        moves: list[Move] = []
        for engines in by_model.values():
            if len(engines) > 1:
                made_room: list[Move] = []
                if self.make_room:
                    made_room, engines = self._make_room(engines, self.max_moves - len(moves))
                moves += made_room
                taken = {move.request_id for move in made_room}
                moves += self._balance(engines, self.max_moves - len(moves), taken)
        return moves

    def started(self, move: Move) -> None:
        self._moving.add(move.request_id)

    def ended(self, request_id: str) -> None:
        """A move finished or was abandoned: the request may be considered again."""
        self._moving.discard(request_id)

    def _make_room(self, engines: list[EngineLoad], budget: int) -> tuple[list[Move], list[EngineLoad]]:
        """The priority rule (module docstring); returns its moves and the loads as they leave them."""
        moves: list[Move] = []
        current = {engine.engine_id: engine for engine in engines}
        for engine_id, source in list(current.items()):
            head = source.waiting_head
            if head is None or source.draining:
                continue
            short = head.blocks - source.free_blocks
            in_the_way = sorted(
                (
                    r
                    for r in source.decoding
                    if r.movable and r.priority > head.priority and r.request_id not in self._moving
                ),
                key=lambda request: (-request.priority, request.context_tokens),
            )
            for request in in_the_way:
                if budget <= 0 or short <= 0:
                    break
                room = [
                    other
                    for other in current.values()
                    if other.engine_id != engine_id
                    and not other.draining
                    and cdiv(request.context_tokens, other.block_size)
                    <= other.free_blocks - other.waiting_blocks
                ]
                if not room:
                    break
                destination = min(room, key=self._load)
                copy = self._copy(source, destination, request)
                if copy is not None and copy.aborted:
                    continue
                moves.append(
                    Move(
                        request.request_id,
                        engine_id,
                        destination.engine_id,
                        "priority",
                        copy,
                        request.context_tokens,
                    )
                )
                source = current[engine_id] = source.without(request)
                current[destination.engine_id] = destination.with_request(request)
                short -= cdiv(request.context_tokens, source.block_size)
                budget -= 1
        return moves, [current[engine.engine_id] for engine in engines]

    def _balance(self, engines: list[EngineLoad], budget: int, taken: set[str]) -> list[Move]:
        """Llumnix's pairing; `taken`: requests already moving in this decision."""
        moves: list[Move] = []
        key = self._load
        ranked = sorted(engines, key=key, reverse=True)
        sources = [engine for engine in ranked if engine.draining]
        receivers = [engine for engine in reversed(ranked) if not engine.draining]
        sources += [engine for engine in ranked if not engine.draining][: len(receivers) // 2]
        for index, source in enumerate(sources):
            if budget <= 0 or not receivers:
                break
            destination = receivers[index % len(receivers)]
            if destination.engine_id == source.engine_id:
                continue
            while budget > 0:
                move = self._one_move(source, destination, taken)
                if move is None:
                    break
                request = next(r for r in source.decoding if r.request_id == move.request_id)
                source, destination = source.without(request), destination.with_request(request)
                moves.append(move)
                budget -= 1
        return moves

    def _load(self, engine: EngineLoad) -> float:
        return engine.drain_s() if self.policy == "drain_time" else -engine.freeness()

    def _one_move(self, source: EngineLoad, destination: EngineLoad, taken: set[str]) -> Move | None:
        before = self._load(source) - self._load(destination)
        if self.policy == "drain_time" and not source.draining and not source.waiting_blocks:
            return None  # nothing waits there: moving its decodes would start no request sooner
        if not source.draining:
            threshold = self.min_gap_s if self.policy == "drain_time" else self.min_freeness_gap
            if before <= threshold:
                return None
        candidates = sorted(
            (
                r
                for r in source.decoding
                if r.movable and r.request_id not in self._moving and r.request_id not in taken
            ),
            key=lambda request: request.context_tokens,
        )
        for request in candidates:
            blocks = cdiv(request.context_tokens, destination.block_size)
            if blocks > destination.free_blocks - destination.waiting_blocks:
                continue
            copy = self._copy(source, destination, request)
            if copy is not None and copy.aborted:
                continue
            after_source, after_destination = source.without(request), destination.with_request(request)
            after = self._load(after_source) - self._load(after_destination)
            if not source.draining and not 0 <= after < before:
                continue  # it would flip the pair, or not help
            if (
                self.policy == "drain_time"
                and not source.draining
                and not self._finishes_sooner(source, destination, request, copy)
            ):
                continue
            reason = "drain" if source.draining else "load"
            return Move(
                request.request_id,
                source.engine_id,
                destination.engine_id,
                reason,
                copy,
                request.context_tokens,
            )
        return None

    def _copy(
        self, source: EngineLoad, destination: EngineLoad, request: DecodingRequest
    ) -> StagedCopy | None:
        if not self.kv:
            return None
        return staged_copy(
            source.cost, destination.cost, request.context_tokens, source.decode_step_s(), source.block_size
        )

    def _finishes_sooner(
        self, source: EngineLoad, destination: EngineLoad, request: DecodingRequest, copy: StagedCopy | None
    ) -> bool:
        """Staying: its tokens left at the source's pace behind the source's queue. Moving: the pause
        (or the recompute as a prefill), the destination's queued prefill, then its pace there."""
        stay = request.tokens_left * source.decode_step_s()
        if source.waiting_prompt_tokens:
            stay += source.cost.iteration_time([(source.waiting_prompt_tokens, 0)], [])
        if copy is not None:
            pause = copy.downtime_s
        else:
            pause = destination.cost.iteration_time([(request.context_tokens, 0)], [])
        queue = (
            destination.cost.iteration_time([(destination.waiting_prompt_tokens, 0)], [])
            if destination.waiting_prompt_tokens
            else 0.0
        )
        move = pause + queue + request.tokens_left * destination.decode_step_s(extra=1)
        return move < stay
