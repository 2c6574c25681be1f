"""The routing contract shared by the live gateway and the simulator.

Everything here is pure: no I/O, no clock reads, no asyncio. Time comes in as `now`, in seconds on
whatever clock the caller runs (the wall clock in the gateway, a virtual one in the simulator).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

from fleetserve.errors import FleetserveError


@dataclass(slots=True)
class RequestInfo:
    """What a policy may know about a request before it runs."""

    request_id: str
    model: str  # the base model; a LoRA request names its adapter separately
    adapter: str | None = None
    prompt_len: int = 0
    max_output_tokens: int = 0
    prompt_token_ids: Sequence[int] | None = None
    block_hashes: Sequence[int] | None = None  # filled lazily by routing code that needs prefix hashes
    tenant: str | None = None
    session: str | None = None
    priority: int = 0
    ttft_slo_ms: float | None = None
    tpot_slo_ms: float | None = None
    arrival_time: float = 0.0


@dataclass(slots=True)
class EngineView:
    """One engine as a policy sees it at decision time.

    `in_flight` is the router's own count of dispatched-but-unfinished requests, which is exact and
    instant; `running`/`waiting`/`kv_usage` are what the engine last reported (scraped live, or read from
    the engine model in the simulator), so they lag. `capacity` is relative throughput, so load can be
    compared across GPU types.
    """

    engine_id: str
    model: str
    gpu: str | None = None
    tp: int = 1
    adapters: frozenset[str] = frozenset()
    healthy: bool = True
    ready: bool = True
    in_flight: int = 0
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    capacity: float = 1.0
    max_loras: int = 0
    num_gpu_blocks: int = 0
    block_size: int = 16
    predictor: Callable[[int, int], float] | None = None  # (prompt_len, cached_tokens) -> TTFT seconds

    @property
    def normalized_load(self) -> float:
        """Outstanding work per unit of capacity. Scraped `waiting` is added on top of `in_flight` on
        purpose: a request queued inside the engine means it is saturated, and should weigh more than one
        that is already being decoded."""
        return (self.in_flight + self.waiting) / self.capacity

    def serves(self, request: RequestInfo) -> bool:
        return self.model == request.model and (request.adapter is None or request.adapter in self.adapters)


class PrefixLookup(Protocol):
    """What a policy needs of the fleet's prefix index (`PrefixIndex` fed by engines' KV events): for
    a prompt's block hashes, engine id -> how many leading blocks it holds."""

    def match(self, block_hashes: Sequence[int], now: float | None = None) -> dict[str, int]: ...


@dataclass(slots=True)
class FleetView:
    engines: Mapping[str, EngineView]
    prefix_index: PrefixLookup | None = None  # the precise index, when engines publish KV events

    def candidates(self, request: RequestInfo) -> list[EngineView]:
        """Engines that serve the request's model and adapter and are healthy and ready, in view order."""
        return [e for e in self.engines.values() if e.healthy and e.ready and e.serves(request)]


@dataclass(frozen=True, slots=True)
class Decision:
    engine_id: str
    reason: str  # a short label, usable as a metric label value


class NoEngineAvailable(FleetserveError):
    """No healthy, ready engine serves the request's model (and adapter)."""


class RejectRequest(FleetserveError):
    """A policy sheds this request; the caller answers with `status` and `message`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Policy(ABC):
    """A routing policy. Subclasses set `name` and implement `choose`; the hooks are optional.

    Constructor parameters are keyword-only and come from the fleet file's `router.params`; a policy
    that draws random numbers takes `seed` and owns its `random.Random`, so a run is reproducible.
    """

    name: ClassVar[str]

    @abstractmethod
    def choose(self, request: RequestInfo, view: FleetView, now: float) -> Decision:
        """Pick an engine. Raises NoEngineAvailable or RejectRequest."""

    def on_dispatch(self, request: RequestInfo, engine_id: str, now: float) -> None:  # noqa: B027 (optional hook)
        """The request was sent to `engine_id`."""

    def on_first_token(self, request: RequestInfo, engine_id: str, now: float) -> None:  # noqa: B027 (optional hook)
        """The first output byte of the request arrived from `engine_id`."""

    def on_finish(self, request: RequestInfo, engine_id: str, now: float) -> None:  # noqa: B027 (optional hook)
        """The request finished on `engine_id` (successfully or not)."""


def require_candidates(request: RequestInfo, view: FleetView) -> list[EngineView]:
    candidates = view.candidates(request)
    if not candidates:
        what = f"model {request.model!r}" + (f" with adapter {request.adapter!r}" if request.adapter else "")
        raise NoEngineAvailable(f"no healthy, ready engine serves {what}")
    return candidates
