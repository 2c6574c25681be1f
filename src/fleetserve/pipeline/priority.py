"""`priority`: an admission queue ordered by priority, FIFO within a priority.

While the fleet has room a request goes straight through; once it is full for the model
(`pipeline/saturation.py`), a request waits here, and each finish lets the most important waiting
request of that model go on: higher `priority` first (the `x-fleetserve-priority` header, a trace
request's `priority` field), and within one priority the one that came first, which is also the one
whose deadline is nearest, as every request may wait `max_wait_s`. A request below `shed_below` is
refused at once when it would wait.

Strict priority can starve the low priorities under sustained overload; that is what the bounded wait
is for (they are refused rather than queued for ever). Fair shares between tenants are the `vtc`
stage's (`fleetserve.tenants.vtc`).
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

from fleetserve.errors import InputError
from fleetserve.pipeline.saturation import fleet_slots
from fleetserve.pipeline.stage import PROCEED, Hold, Outcome, Refuse, Stage, Verdict
from fleetserve.routing.base import FleetView, RequestInfo


@dataclass(order=True, slots=True)
class _Waiting:
    rank: tuple[int, int]  # (-priority, arrival order): the heap's order
    request: RequestInfo = field(compare=False)
    withdrawn: bool = field(default=False, compare=False)


class PriorityQueueStage(Stage):
    name = "priority"

    def __init__(self, *, slots_per_engine: int = 32, max_wait_s: float = 30.0, shed_below: int = 0) -> None:
        if slots_per_engine < 1:
            raise InputError("slots_per_engine must be at least 1")
        if not max_wait_s > 0:
            raise InputError("max_wait_s must be positive")
        self.slots_per_engine = slots_per_engine
        self.max_wait_s = max_wait_s
        self.shed_below = shed_below
        self._through: dict[str, int] = {}  # model -> requests let through and not yet finished
        self._waiting: dict[str, list[_Waiting]] = {}  # model -> heap
        self._entries: dict[str, _Waiting] = {}  # request id -> its entry, while it waits
        self._order = itertools.count()

    @property
    def waiting(self) -> int:
        return len(self._entries)

    def slots(self, model: str, view: FleetView) -> int:
        return fleet_slots(model, view, self.slots_per_engine)

    def admit(self, request: RequestInfo, view: FleetView, now: float) -> Verdict:
        model = request.model
        through = self._through.get(model, 0)
        if not self._waiting.get(model) and through < self.slots(model, view):
            self._through[model] = through + 1
            return PROCEED
        if request.priority < self.shed_below:
            return Refuse(
                503, "the fleet is at capacity and this request's priority is sheddable", "shed", 1.0
            )
        entry = _Waiting((-request.priority, next(self._order)), request)
        heapq.heappush(self._waiting.setdefault(model, []), entry)
        self._entries[request.request_id] = entry
        timeout = Refuse(
            503,
            f"the fleet stayed at capacity for {self.max_wait_s:g} s while this request waited",
            "queue_timeout",
            1.0,
        )
        return Hold("fleet_full", now + self.max_wait_s, timeout)

    def release(self, view: FleetView, now: float) -> RequestInfo | None:
        best: _Waiting | None = None
        for model, heap in self._waiting.items():
            while heap and heap[0].withdrawn:
                heapq.heappop(heap)
            if (
                heap
                and (best is None or heap[0].rank < best.rank)
                and self._through.get(model, 0) < self.slots(model, view)
            ):
                best = heap[0]
        if best is None:
            return None
        request = best.request
        heapq.heappop(self._waiting[request.model])
        del self._entries[request.request_id]
        self._through[request.model] = self._through.get(request.model, 0) + 1
        return request

    def withdraw(self, request: RequestInfo) -> None:
        entry = self._entries.pop(request.request_id, None)
        if entry is not None:
            entry.withdrawn = True

    def on_finish(self, request: RequestInfo, outcome: Outcome, now: float) -> None:
        self._through[request.model] -= 1
