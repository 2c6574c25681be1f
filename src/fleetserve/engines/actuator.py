"""The live `FleetActuator`s: engines of the fleet file's groups started as processes, registered with
the gateway once they answer, drained and stopped on request.

`ProcessActuator` holds what every live actuator does alike: engine ids, the events (`starting` at
once, `ready` when the engine answers its ready path, after which the gateway routes to it once its
own health probe passes; `draining`; `gone` once stopped, or with `failed` when it never came up),
drains that wait for the engine's last request, and stopping an engine that is still starting. Where
the process runs is the subclass's: `LocalActuator` starts it on this machine, through the same
`EngineLauncher` as `serve` (so it dies with fleetserve like the others); `RayActuator`
(`engines/ray_actuator.py`) on a node of a Ray cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from abc import abstractmethod
from collections.abc import Awaitable, Callable, Collection
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from fleetserve.config import EngineDescription, EngineGroup, EngineInstance, FleetConfig, kv_event_ports
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

Handle = TypeVar("Handle")  # what a subclass keeps to stop a process it started
Launch = Callable[[], Awaitable[tuple[EngineInstance, Handle]]]


class FleetMembership(Protocol):
    """What the actuator needs of the gateway (`Gateway` is one)."""

    def add_engine(self, description: EngineDescription) -> Any: ...
    def remove_engine(self, engine_id: str) -> Any: ...
    def set_draining(self, engine_id: str) -> None: ...
    def in_flight(self, engine_id: str) -> int | None: ...
    def engine_ids(self) -> Collection[str]: ...
    def group_of(self, engine_id: str) -> str | None: ...


class ProcessActuator(FleetActuator, Generic[Handle]):
    def __init__(
        self,
        config: FleetConfig,
        membership: FleetMembership,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._config = config
        self._groups = {group.name: group for group in config.engines}
        self._membership = membership
        self._clock = clock
        self._starting: dict[str, tuple[str, asyncio.Task[None]]] = {}  # engine id -> (group, bring-up)
        self._handles: dict[str, Handle] = {}  # engines this actuator started (or was given)
        self._draining: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @abstractmethod
    def _prepare(self, group: EngineGroup, engine_id: str) -> Launch[Handle]:
        """Check that an engine of `group` can be started (raise CannotStart saying why not) and return
        what starts it: an awaitable that answers once the engine answers its ready path, with where it
        listens and the handle `_terminate` stops it by (EngineStartError when it never came up)."""

    @abstractmethod
    async def _terminate(self, handle: Handle) -> None:
        """Stop the engine's process."""

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
        taken = {*self._membership.engine_ids(), *self._starting, *self._handles}
        engine_id = next_engine_id(group, taken)
        launch = self._prepare(spec, engine_id)
        self._emit(EngineChange(engine_id, group, EngineEvent.STARTING, now))
        self._starting[engine_id] = (group, self._background(self._bring_up(engine_id, group, launch)))
        return engine_id

    async def _bring_up(self, engine_id: str, group: str, launch: Launch[Handle]) -> None:
        try:
            instance, handle = await launch()
        except asyncio.CancelledError:  # stopped while starting (its process is stopped with it)
            self._emit(EngineChange(engine_id, group, EngineEvent.GONE, self._clock()))
            raise
        except (EngineStartError, CannotStart, OSError) as exc:
            log.error("engine %s of group %s did not start: %s", engine_id, group, exc)
            self._emit(EngineChange(engine_id, group, EngineEvent.GONE, self._clock(), failed=True))
            return
        finally:
            self._starting.pop(engine_id, None)
        self._handles[engine_id] = handle
        self._membership.add_engine(instance.description())
        log.info("engine %s of group %s started at %s", engine_id, group, instance.url)
        self._emit(EngineChange(engine_id, group, EngineEvent.READY, self._clock()))

    def drain(self, engine_id: str, now: float, timeout_s: float | None = None) -> None:
        if engine_id in self._starting:  # nothing runs on it yet
            self.stop(engine_id, now)
            return
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
        starting = self._starting.get(engine_id)
        if starting is not None:
            starting[1].cancel()
            return
        if self._membership.in_flight(engine_id) is None:
            raise UnknownEngine(f"no engine {engine_id!r} is registered")
        group = self._group_of(engine_id)
        self._membership.remove_engine(engine_id)
        self._draining.discard(engine_id)
        if engine_id not in self._handles:  # someone else's engine: unregistered, not killed
            self._emit(EngineChange(engine_id, group, EngineEvent.GONE, now))
            return
        self._background(self._stop_process(engine_id, self._handles.pop(engine_id), group))

    async def _stop_process(self, engine_id: str, handle: Handle, group: str) -> None:
        await self._terminate(handle)
        self._emit(EngineChange(engine_id, group, EngineEvent.GONE, self._clock()))

    def manages(self, engine_id: str) -> bool:
        return engine_id in self._handles or engine_id in self._starting

    async def close(self) -> None:
        """Stop what is under way, then every engine this actuator started or was given."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        handles, self._handles = self._handles, {}
        for engine_id, handle in handles.items():
            log.info("stopping engine %s", engine_id)
            with contextlib.suppress(Exception):
                await self._terminate(handle)

    def _group_of(self, engine_id: str) -> str:
        return self._membership.group_of(engine_id) or engine_id  # an engine of no group: its own name

    def _background(self, work: Any) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


class LocalActuator(ProcessActuator[LaunchedEngine]):
    """Engines as processes on this machine, on a free port of `emulator.host` (an emulated engine gets
    a process of its own; llama.cpp, vLLM and SGLang engines the command lines of
    `engines/commands.py`)."""

    def __init__(
        self,
        config: FleetConfig,
        launcher: EngineLauncher,
        membership: FleetMembership,
        work_dir: Path,
        clock: Callable[[], float] = time.monotonic,
        launched: Collection[LaunchedEngine] = (),
    ) -> None:
        """`launched`: processes already started for the fleet file's engines; those that are one engine
        each (a replica of an autoscaled group, a llama.cpp server) are stopped, not only unregistered,
        when that engine is."""
        super().__init__(config, membership, clock)
        self._launcher = launcher
        self._work_dir = work_dir
        replicas = {instance.engine_id for instance in config.instances()}
        self._handles.update({engine.name: engine for engine in launched if engine.name in replicas})

    def _prepare(self, group: EngineGroup, engine_id: str) -> Launch[LaunchedEngine]:
        host = self._config.emulator.host
        try:
            port = free_port(host, with_kv_events=group.kv_events)
        except OSError as exc:
            raise CannotStart(str(exc)) from None
        instance = EngineInstance(engine_id, group, port, f"http://{host}:{port}")
        try:
            spec = checked_spec(self._config, instance, self._work_dir)
        except LaunchError as exc:  # says what is missing
            raise CannotStart(str(exc)) from None

        async def launch() -> tuple[EngineInstance, LaunchedEngine]:
            (engine,) = await self._launcher.astart([spec])
            log.info("engine %s runs in pid %d", engine_id, engine.pid)
            return instance, engine

        return launch

    async def _terminate(self, handle: LaunchedEngine) -> None:
        await asyncio.to_thread(self._launcher.stop_engine, handle)


def free_port(host: str, *, with_kv_events: bool) -> int:
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
