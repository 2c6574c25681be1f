"""The live set of engines, added and removed at run time. `version` moves on every membership or health
change, so what is derived from the set (views, the model listing, capacities) can be cached."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from fleetserve.errors import InputError
from fleetserve.fleet.state import EngineState


class DuplicateEngine(InputError):
    """An engine id that is already registered."""


class EngineRegistry:
    def __init__(self) -> None:
        self._engines: dict[str, EngineState] = {}
        self.version = 0  # bumped on every membership or health change, so derived views can be cached
        self._listeners: list[Callable[[], None]] = []

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call `listener` after every membership or health change (an engine joined: held requests
        may go on)."""
        self._listeners.append(listener)

    def add(self, engine: EngineState) -> None:
        if engine.engine_id in self._engines:
            raise DuplicateEngine(f"engine {engine.engine_id!r} already exists")
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
        for listener in self._listeners:
            listener()

    def routable(self) -> Iterable[EngineState]:
        return (engine for engine in self._engines.values() if engine.health.routable)
