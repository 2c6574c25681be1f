"""Arrival schedules: Poisson/Gamma rates, trace timestamps, closed-loop concurrency, limits."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Coroutine, Iterator
from typing import Any

import numpy as np
import pytest

from fleetserve.bench.arrivals import Limits, gamma_offsets, run_closed_loop, run_open_loop, trace_offsets
from fleetserve.bench.client import BenchRequest


class VirtualClock:
    """Time moves only when the (single) schedule sleeps, and only after the tasks it just started ran,
    as they would in the microseconds before a real sleep ends; tests see exact send times."""

    def __init__(self) -> None:
        self.time = 100.0

    def now(self) -> float:
        return self.time

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(0)
        self.time += seconds


def run(coroutine: Coroutine[Any, Any, int]) -> int:
    return asyncio.run(coroutine)


def requests(count: int | None = None) -> Iterator[BenchRequest]:
    indexes = range(count) if count is not None else itertools.count()
    return (BenchRequest(index=i, prompt="p", input_tokens=1, max_tokens=1, model="m") for i in indexes)


def gaps(rate: float, burstiness: float, n: int = 40_000) -> np.ndarray:
    offsets = np.fromiter(itertools.islice(gamma_offsets(rate, burstiness, seed=3), n), dtype=float)
    return np.diff(np.concatenate([[0.0], offsets]))


def test_poisson_offsets_have_the_requested_rate_and_exponential_gaps() -> None:
    intervals = gaps(rate=20.0, burstiness=1.0)
    assert intervals.mean() == pytest.approx(1 / 20.0, rel=0.03)
    # Exponential gaps: standard deviation equals the mean (coefficient of variation 1).
    assert intervals.std() / intervals.mean() == pytest.approx(1.0, rel=0.05)
    assert (intervals > 0).all()


def test_burstiness_keeps_the_rate_and_changes_the_variability() -> None:
    bursty, regular = gaps(rate=20.0, burstiness=0.25), gaps(rate=20.0, burstiness=4.0)
    assert bursty.mean() == pytest.approx(0.05, rel=0.05)
    assert regular.mean() == pytest.approx(0.05, rel=0.05)
    # Gamma(k) gaps have a squared coefficient of variation of 1/k.
    assert (bursty.std() / bursty.mean()) ** 2 == pytest.approx(4.0, rel=0.1)
    assert (regular.std() / regular.mean()) ** 2 == pytest.approx(0.25, rel=0.1)


def test_same_seed_same_schedule() -> None:
    first = list(itertools.islice(gamma_offsets(5.0, 1.0, seed=7), 100))
    assert first == list(itertools.islice(gamma_offsets(5.0, 1.0, seed=7), 100))
    assert first != list(itertools.islice(gamma_offsets(5.0, 1.0, seed=8), 100))


def test_infinite_rate_sends_at_once() -> None:
    assert list(itertools.islice(gamma_offsets(float("inf")), 5)) == [0.0] * 5


def test_trace_offsets_keep_spacing_and_scale() -> None:
    assert trace_offsets([1000.0, 1500.0, 3000.0]) == pytest.approx([0.0, 0.5, 2.0])
    assert trace_offsets([1000.0, 1500.0, 3000.0], rate_scale=2.0) == pytest.approx([0.0, 0.25, 1.0])
    assert trace_offsets([]) == []


def test_limits() -> None:
    assert Limits().allows(10**9, 10.0**9)
    assert not Limits(num_requests=3).allows(3, 0.0)
    assert not Limits(duration_s=2.0).allows(0, 2.0)
    assert Limits(2.0, 3).allows(2, 1.99)


def test_open_loop_sends_at_the_trace_timestamps_until_the_duration() -> None:
    clock = VirtualClock()
    start = clock.now()
    sent: list[tuple[int, float, float]] = []

    async def send(request: BenchRequest, scheduled_at: float) -> None:
        sent.append((request.index, scheduled_at, clock.now() - start))

    offsets = trace_offsets([0.0, 250.0, 250.0, 1200.0, 4000.0, 9000.0])
    count = run(run_open_loop(zip(offsets, requests(6), strict=True), send, Limits(5.0), clock, start))
    assert count == 5
    assert [index for index, _, _ in sent] == [0, 1, 2, 3, 4]
    assert [at for _, at, _ in sent] == pytest.approx([0.0, 0.25, 0.25, 1.2, 4.0])
    for _, scheduled, actual in sent:
        assert actual == pytest.approx(scheduled)


def test_open_loop_does_not_wait_for_responses() -> None:
    clock = VirtualClock()
    release = asyncio.Event()
    in_flight = 0
    most_in_flight = 0

    async def send(request: BenchRequest, scheduled_at: float) -> None:
        nonlocal in_flight, most_in_flight
        in_flight += 1
        most_in_flight = max(most_in_flight, in_flight)
        if request.index == 9:
            release.set()
        await release.wait()
        in_flight -= 1

    timed = zip(gamma_offsets(50.0, seed=1), requests(), strict=False)
    count = run(run_open_loop(timed, send, Limits(num_requests=10), clock, clock.now()))
    assert count == 10
    assert most_in_flight == 10
    assert in_flight == 0


def test_closed_loop_never_exceeds_its_concurrency() -> None:
    clock = VirtualClock()
    in_flight = 0
    most_in_flight = 0
    rng = np.random.default_rng(0)

    async def send(request: BenchRequest, scheduled_at: float) -> None:
        nonlocal in_flight, most_in_flight
        in_flight += 1
        most_in_flight = max(most_in_flight, in_flight)
        for _ in range(int(rng.integers(0, 5))):
            await asyncio.sleep(0)
        in_flight -= 1

    count = run(run_closed_loop(requests(), send, 4, Limits(num_requests=200), clock, clock.now()))
    assert count == 200
    assert most_in_flight == 4


def test_closed_loop_stops_when_the_requests_run_out() -> None:
    clock = VirtualClock()
    seen: list[int] = []

    async def send(request: BenchRequest, scheduled_at: float) -> None:
        seen.append(request.index)
        await asyncio.sleep(0)

    count = run(run_closed_loop(requests(7), send, 3, Limits(num_requests=100), clock, clock.now()))
    assert count == 7
    assert sorted(seen) == list(range(7))


def test_closed_loop_stops_issuing_after_the_duration() -> None:
    clock = VirtualClock()
    start = clock.now()

    async def send(request: BenchRequest, scheduled_at: float) -> None:
        assert scheduled_at < 1.0
        await clock.sleep(0.125)  # each request takes 125 ms of virtual time (exact in binary)

    count = run(run_closed_loop(requests(), send, 1, Limits(duration_s=1.0), clock, start))
    assert count == 8
