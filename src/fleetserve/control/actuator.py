"""`FleetActuator`: how anything that changes the fleet's shape (an operator, a script, an autoscaler)
starts, drains and stops engines, whichever clock the fleet runs on.

The calls return at once; what happens to the engine comes back as `EngineChange` events, in this
order: `starting` (the process or simulated engine exists, takes no requests), `ready` (it serves),
`draining` (it takes no new requests; those on it finish, for at most the drain timeout) and `gone`.
The live actuator (`fleetserve.engines.actuator`) starts local processes and registers them with the
gateway; the simulator's (`fleetserve.sim.actuator`) adds engine models that come up after the engine
model's cold-start time. A fleet script, `parse_fleet_script`, is a list of such calls at given times,
which `fleetserve sim --fleet-script` replays and which a live run can replay through the admin API.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from fleetserve.errors import FleetserveError, InputError


class EngineEvent(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    GONE = "gone"


@dataclass(frozen=True, slots=True)
class EngineChange:
    engine_id: str
    group: str
    event: EngineEvent
    at: float  # seconds on the actuator's clock
    failed: bool = False  # gone: it never came up (its process died or could not start)


Listener = Callable[[EngineChange], None]


class UnknownGroup(InputError):
    """An engine group the fleet file does not define (or one that cannot be started this way)."""


class UnknownEngine(InputError, LookupError):
    """No engine of the fleet has that id."""


class CannotStart(FleetserveError):
    """This machine cannot start an engine of that group (a program is missing, no port is free...)."""


class FleetActuator(ABC):
    """Starts, drains and stops engines of the fleet file's groups."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> None:
        """Call `listener` with every EngineChange from now on."""
        self._listeners.append(listener)

    def _emit(self, change: EngineChange) -> None:
        for listener in self._listeners:
            listener(change)

    @abstractmethod
    def start(self, group: str, now: float) -> str:
        """Start one more engine of `group`; returns its id (see `next_engine_id`). Raises UnknownGroup,
        or CannotStart when this machine cannot run it."""

    @abstractmethod
    def drain(self, engine_id: str, now: float, timeout_s: float | None = None) -> None:
        """Send the engine no new requests; stop it once those on it finish, or after `timeout_s`
        (None: the fleet file's gateway.drain_timeout_s). Raises UnknownEngine."""

    @abstractmethod
    def stop(self, engine_id: str, now: float) -> None:
        """Stop the engine now; requests still on it fail. Raises UnknownEngine."""

    @abstractmethod
    def manages(self, engine_id: str) -> bool:
        """Whether this actuator started the engine (and so `stop` ends it, not just unregisters it)."""


def next_engine_id(group: str, taken: Collection[str]) -> str:
    """The id a new engine of `group` gets: GROUP-N with the smallest N not in use, as the fleet file
    names its replicas, so the live fleet and the simulator name a started engine alike."""
    n = 0
    while f"{group}-{n}" in taken:
        n += 1
    return f"{group}-{n}"


FleetAction = Literal["start", "drain", "stop"]


@dataclass(frozen=True, slots=True)
class FleetStep:
    """One step of a fleet script: at `at_s` seconds after the run starts, `action` on a target: a
    group for `start`, an engine id for `drain` and `stop`."""

    at_s: float
    action: FleetAction
    target: str
    timeout_s: float | None = None  # drain only


def parse_fleet_script(entries: Iterable[Mapping[str, Any]], source: str = "fleet script") -> list[FleetStep]:
    """Steps from a YAML list such as `[{at_s: 30, start: h100}, {at_s: 90, drain: l4-0, timeout_s: 60}]`,
    in time order (steps at one time keep the order given). Raises InputError naming the bad entry."""
    steps: list[FleetStep] = []
    for index, entry in enumerate(entries):
        where = f"{source}[{index}]"
        if not isinstance(entry, Mapping):
            raise InputError(f"{where}: a step is a mapping such as {{at_s: 30, start: h100}}")
        actions = [key for key in ("start", "drain", "stop") if key in entry]
        unknown = sorted(set(entry) - {"at_s", "start", "drain", "stop", "timeout_s"})
        if unknown:
            raise InputError(
                f"{where}: unknown key(s) {', '.join(unknown)}; a step has at_s, one of"
                " start/drain/stop, and timeout_s for a drain"
            )
        if len(actions) != 1:
            raise InputError(f"{where}: name exactly one of start (a group), drain or stop (an engine id)")
        action = actions[0]
        at_s, target, timeout_s = entry.get("at_s"), entry[action], entry.get("timeout_s")
        if isinstance(at_s, bool) or not isinstance(at_s, int | float) or at_s < 0:
            raise InputError(f"{where}.at_s: seconds from the start of the run, a number >= 0")
        if not isinstance(target, str) or not target:
            raise InputError(f"{where}.{action}: a {'group name' if action == 'start' else 'engine id'}")
        if timeout_s is not None and (
            action != "drain"
            or isinstance(timeout_s, bool)
            or not isinstance(timeout_s, int | float)
            or timeout_s < 0
        ):
            raise InputError(f"{where}.timeout_s: only a drain takes one, seconds >= 0")
        steps.append(FleetStep(float(at_s), action, target, None if timeout_s is None else float(timeout_s)))
    return sorted(steps, key=lambda step: step.at_s)
