"""Which engines the fleet has, in which lifecycle state and since when, as the actuator's events tell
it: the record the autoscalers, the admin API's engine list and the `fleetserve_engines` gauge all
read, under either clock.

Engines that served before anyone listened (the fleet file's, started before the gateway or the
simulation) are `adopt`ed as ready; every other engine arrives through `record`, fed by the actuator's
`EngineChange` events (`starting`, `ready`, `draining`, `gone`: a gone engine leaves the record).
"""

from __future__ import annotations

from dataclasses import dataclass

from fleetserve.control.actuator import EngineChange, EngineEvent

LIFECYCLE_STATES = (EngineEvent.STARTING, EngineEvent.READY, EngineEvent.DRAINING)


@dataclass(frozen=True, slots=True)
class Member:
    engine_id: str
    group: str
    state: EngineEvent  # starting, ready or draining
    since: float  # when it entered that state, on the actuator's clock


class FleetMembers:
    def __init__(self) -> None:
        self._members: dict[str, Member] = {}

    def adopt(self, engine_id: str, group: str, now: float) -> None:
        """An engine that serves already (not started through the actuator): ready since `now`."""
        if engine_id not in self._members:
            self._members[engine_id] = Member(engine_id, group, EngineEvent.READY, now)

    def record(self, change: EngineChange) -> None:
        """An actuator event (subscribe this method to the actuator)."""
        if change.event is EngineEvent.GONE:
            self._members.pop(change.engine_id, None)
            return
        known = self._members.get(change.engine_id)
        if known is not None and known.state is change.event:
            return
        if known is not None and known.state is EngineEvent.DRAINING:
            return  # a drain is final: an engine coming up late does not serve again
        self._members[change.engine_id] = Member(change.engine_id, change.group, change.event, change.at)

    def forget(self, engine_id: str) -> None:
        """The engine left the fleet without an actuator's word (unregistered through the admin API)."""
        self._members.pop(engine_id, None)

    def get(self, engine_id: str) -> Member | None:
        return self._members.get(engine_id)

    def of_group(self, group: str) -> list[Member]:
        return [member for member in self._members.values() if member.group == group]

    def all(self) -> list[Member]:
        return list(self._members.values())

    def counts(self) -> dict[tuple[str, str], int]:
        """(group, state) -> engines, with a 0 for each state a known group has none in."""
        counts: dict[tuple[str, str], int] = {}
        for member in self._members.values():
            for state in LIFECYCLE_STATES:
                counts.setdefault((member.group, state.value), 0)
            counts[member.group, member.state.value] += 1
        return counts
