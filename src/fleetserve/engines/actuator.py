"""The live `FleetActuator`: engines of the fleet file's groups started as local processes on this
machine, registered with the gateway once they answer, drained and stopped on request.

It starts any kind fleetserve launches (an emulated engine gets a process of its own; llama.cpp, vLLM
and SGLang engines the command lines of `engines/commands.py`) on a free port of `emulator.host`,
through the same `EngineLauncher` as `serve`, so a started engine dies with fleetserve like the others.
Events: `starting` at once, `ready` when the process answers its ready path (the gateway routes to it
after its own health probe passes), `draining`, and `gone` once it is stopped, or when it never came up
(the reason and the end of its log are logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, Protocol

from fleetserve.config import EngineDescription, EngineInstance, FleetConfig, kv_event_ports
from fleetserve.control import (
    CannotStart,
    EngineChange,
    EngineEvent,
    FleetActuator,
    UnknownEngine,
    UnknownGroup,
    next_engine_id,
)
from fleetserve.engines.fleet import LaunchError, busy_ports, checked_spec
from fleetserve.engines.kinds import ENGINE_KINDS
from fleetserve.engines.launcher import EngineLauncher, EngineStartError, LaunchedEngine

log = logging.getLogger(__name__)

DRAIN_POLL_S = 0.05  # how often a drain looks whether the engine's last request has finished
_PORT_ATTEMPTS = 20


class FleetMembership(Protocol):
    """What the actuator needs of the gateway (`Gateway` is one)."""

    def add_engine(self, description: EngineDescription) -> Any: ...
    def remove_engine(self, engine_id: str) -> Any: ...
    def set_draining(self, engine_id: str) -> None: ...
    def in_flight(self, engine_id: str) -> int | None: ...
    def engine_ids(self) -> Collection[str]: ...
    def group_of(self, engine_id: str) -> str | None: ...


class LocalActuator(FleetActuator):
    def __init__(
        self,
        config: FleetConfig,
        launcher: EngineLauncher,
        membership: FleetMembership,
        work_dir: Path,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._config = config
        self._groups = {group.name: group for group in config.engines}
        self._launcher = launcher
        self._membership = membership
        self._work_dir = work_dir
        self._clock = clock
        self._starting: set[str] = set()
        self._launched: dict[str, LaunchedEngine] = {}
        self._draining: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, group: str, now: float) -> str:
        spec = self._groups.get(group)
        if spec is None:
            raise UnknownGroup(
                f"no engine group {group!r} in the fleet file; groups: {', '.join(self._groups)}"
            )
        if not ENGINE_KINDS[spec.kind].launched:
            raise UnknownGroup(
                f"engine group {group!r} is {spec.kind}: fleetserve does not start its engines"
            )
        taken = {*self._membership.engine_ids(), *self._starting, *self._launched}
        engine_id = next_engine_id(group, taken)
        host = self._config.emulator.host
        port = _free_port(host, with_kv_events=spec.kv_events)
        instance = EngineInstance(engine_id, spec, port, f"http://{host}:{port}")
        try:
            launch = checked_spec(self._config, instance, self._work_dir)
        except LaunchError as exc:  # says what is missing
            raise CannotStart(str(exc)) from None
        self._starting.add(engine_id)
        self._emit(EngineChange(engine_id, group, EngineEvent.STARTING, now))
        self._background(self._bring_up(instance, launch))
        return engine_id

    async def _bring_up(self, instance: EngineInstance, launch: Any) -> None:
        engine_id, group = instance.engine_id, instance.group.name
        try:
            (engine,) = await self._launcher.astart([launch])
        except EngineStartError as exc:
            log.error("engine %s of group %s did not start: %s", engine_id, group, exc)
            self._emit(EngineChange(engine_id, group, EngineEvent.GONE, self._clock()))
            return
        finally:
            self._starting.discard(engine_id)
        self._launched[engine_id] = engine
        self._membership.add_engine(instance.description())
        log.info("engine %s of group %s started at %s (pid %d)", engine_id, group, engine.url, engine.pid)
        self._emit(EngineChange(engine_id, group, EngineEvent.READY, self._clock()))

    def drain(self, engine_id: str, now: float, timeout_s: float | None = None) -> None:
        if self._membership.in_flight(engine_id) is None:
            raise UnknownEngine(f"no engine {engine_id!r} is registered")
        if engine_id in self._draining:
            return
        self._draining.add(engine_id)
        self._membership.set_draining(engine_id)
        self._emit(EngineChange(engine_id, self._group_of(engine_id), EngineEvent.DRAINING, now))
        timeout = self._config.gateway.drain_timeout_s if timeout_s is None else timeout_s
        self._background(self._finish_drain(engine_id, now + timeout))

    async def _finish_drain(self, engine_id: str, deadline: float) -> None:
        while (self._membership.in_flight(engine_id) or 0) > 0 and self._clock() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        if self._membership.in_flight(engine_id) is not None:
            left = self._membership.in_flight(engine_id) or 0
            if left:
                log.warning(
                    "engine %s: drain timed out with %d request(s) on it; stopping it", engine_id, left
                )
            self.stop(engine_id, self._clock())

    def stop(self, engine_id: str, now: float) -> None:
        if self._membership.in_flight(engine_id) is None:
            raise UnknownEngine(f"no engine {engine_id!r} is registered")
        group = self._group_of(engine_id)
        self._membership.remove_engine(engine_id)
        self._draining.discard(engine_id)
        engine = self._launched.pop(engine_id, None)
        if engine is None:  # someone else's engine: unregistered, not killed
            self._emit(EngineChange(engine_id, group, EngineEvent.GONE, now))
            return
        self._background(self._stop_process(engine, group))

    async def _stop_process(self, engine: LaunchedEngine, group: str) -> None:
        await asyncio.to_thread(self._launcher.stop_engine, engine)
        self._emit(EngineChange(engine.name, group, EngineEvent.GONE, self._clock()))

    def manages(self, engine_id: str) -> bool:
        return engine_id in self._launched

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _group_of(self, engine_id: str) -> str:
        return self._membership.group_of(engine_id) or engine_id  # an engine of no group: its own name

    def _background(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _free_port(host: str, *, with_kv_events: bool) -> int:
    """A port nothing listens on (and, for an engine that publishes KV events, its +1000 and +2000)."""
    for _ in range(_PORT_ATTEMPTS):
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if not with_kv_events:
            return port
        publish, replay = kv_event_ports(port)
        if replay <= 65535 and not busy_ports(host, [publish, replay]):
            return port
    raise OSError(f"no free port (with its KV-event ports) found on {host}")
