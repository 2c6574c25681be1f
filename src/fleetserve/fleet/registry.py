"""The live set of engines: added and removed at run time, each with its own in-flight counter.

The in-flight counter is the gateway's own count of requests dispatched to an engine and not yet
finished. Only dispatch and completion move it: health checks and scrapes never reset it, so an engine
that flaps does not look idle while it still holds requests.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fleetserve.config import MetricsDialect

if TYPE_CHECKING:
    from fleetserve.fleet.health import EngineHealth
    from fleetserve.fleet.scrape import EngineMetrics


@dataclass(frozen=True, slots=True)
class ModelEntry:
    """One entry of an engine's /v1/models: a base model (parent None) or a LoRA adapter of `parent`."""

    id: str
    parent: str | None
    raw: dict[str, Any]


@dataclass(eq=False)
class EngineState:
    engine_id: str
    url: str  # base URL without a trailing slash, e.g. http://127.0.0.1:8100
    model: str
    health: EngineHealth
    gpu: str | None = None
    tp: int = 1
    dialect: MetricsDialect = "vllm"
    configured_adapters: frozenset[str] = frozenset()
    capacity: float = 1.0
    max_loras: int = 0
    block_size: int = 16
    time_scale: float = 1.0  # an emulated engine's: its durations are the engine model's times this
    forward_auth: bool = True  # clients' Authorization headers go to this engine
    models: tuple[ModelEntry, ...] = ()  # from the engine's last good /v1/models
    metrics: EngineMetrics | None = None
    in_flight: int = field(default=0, init=False)
    removed: bool = field(default=False, init=False)

    @property
    def adapters(self) -> frozenset[str]:
        """Adapters from the fleet file plus those the engine lists as children of its model."""
        listed = {entry.id for entry in self.models if entry.parent is not None}
        return self.configured_adapters | listed

    @property
    def served_names(self) -> frozenset[str]:
        return frozenset({self.model, *self.adapters})


class EngineRegistry:
    def __init__(self) -> None:
        self._engines: dict[str, EngineState] = {}
        self.version = 0  # bumped on every membership or health change, so derived views can be cached

    def add(self, engine: EngineState) -> None:
        if engine.engine_id in self._engines:
            raise ValueError(f"engine {engine.engine_id!r} already exists")
        self._engines[engine.engine_id] = engine
        self.changed()

    def remove(self, engine_id: str) -> EngineState:
        """Stop routing to the engine. Requests already on it finish normally."""
        engine = self._engines.pop(engine_id)
        engine.removed = True
        self.changed()
        return engine

    def get(self, engine_id: str) -> EngineState | None:
        return self._engines.get(engine_id)

    def engines(self) -> list[EngineState]:
        return list(self._engines.values())

    def __len__(self) -> int:
        return len(self._engines)

    def __contains__(self, engine_id: object) -> bool:
        return engine_id in self._engines

    def changed(self) -> None:
        self.version += 1

    @staticmethod
    def dispatched(engine: EngineState) -> None:
        engine.in_flight += 1

    @staticmethod
    def finished(engine: EngineState) -> None:
        engine.in_flight -= 1

    def routable(self) -> Iterable[EngineState]:
        return (engine for engine in self._engines.values() if engine.health.routable)
