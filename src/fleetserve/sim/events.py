"""Virtual time and the simulator's pending engine wake-ups.

Arrivals come from the trace in order and need no queue; what needs one is "engine E has work to do at
time t", and that time moves whenever a request is added to E or E is advanced. `WakeupQueue` keeps one
pending time per key on a heap and drops superseded entries lazily when they surface, so rescheduling
is O(log n) and nothing is ever searched.
"""

from __future__ import annotations

import heapq
import math

from fleetserve.errors import InternalError


class VirtualClock:
    """Simulated seconds. Time only moves forward; going back is a simulator bug, not a user error."""

    __slots__ = ("now",)

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def advance_to(self, time: float) -> None:
        if time < self.now:
            raise InternalError(f"virtual clock cannot go back from {self.now} to {time}")
        self.now = time


class WakeupQueue:
    """At most one pending wake-up time per integer key, popped in (time, key) order."""

    __slots__ = ("_heap", "_pending")

    def __init__(self, num_keys: int) -> None:
        self._heap: list[tuple[float, int]] = []
        self._pending: list[float] = [math.inf] * num_keys

    def schedule(self, key: int, time: float | None) -> None:
        """Set key's wake-up time (None cancels it). The old entry stays on the heap, marked stale."""
        if time is None:
            self._pending[key] = math.inf
            return
        if time != self._pending[key]:
            self._pending[key] = time
            heapq.heappush(self._heap, (time, key))

    def grow(self, num_keys: int) -> None:
        """Make room for keys up to num_keys - 1 (an engine joined the run)."""
        self._pending.extend([math.inf] * (num_keys - len(self._pending)))

    def pending(self, key: int) -> float:
        return self._pending[key]

    def pop_due(self, until: float) -> list[int]:
        """Remove and return every key whose wake-up time is <= until, earliest first, ties by key."""
        heap, pending = self._heap, self._pending
        due: list[int] = []
        while heap and heap[0][0] <= until:
            time, key = heapq.heappop(heap)
            if pending[key] == time:
                pending[key] = math.inf
                due.append(key)
        return due

    def next_time(self) -> float:
        """The earliest live wake-up time, or inf when nothing is pending."""
        heap, pending = self._heap, self._pending
        while heap and pending[heap[0][1]] != heap[0][0]:
            heapq.heappop(heap)
        return heap[0][0] if heap else math.inf

    def __bool__(self) -> bool:
        return self.next_time() != math.inf
