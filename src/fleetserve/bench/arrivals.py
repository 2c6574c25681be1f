"""When requests are sent.

Open loop: each request has a send time fixed in advance (from a trace's timestamps, or Poisson/Gamma
inter-arrival gaps), independent of how fast the server answers, so a slow server sees its queue grow
as real users would make it grow. Closed loop: a fixed number of simulated users, each sending its next
request as soon as its previous one finished, so at most `concurrency` requests are ever in flight.

Both stop issuing at the first of `num_requests` sent, `duration_s` elapsed or the requests running out,
then wait for what is in flight (each request is bounded by the client's timeout).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fleetserve.bench.client import BenchRequest
from fleetserve.errors import InputError
from fleetserve.workload.generators import arrival_gaps

# send(request, scheduled_at) where scheduled_at is seconds since the start of the run.
Send = Callable[[BenchRequest, float], Awaitable[object]]


class Clock(Protocol):
    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class WallClock:
    def now(self) -> float:
        return time.perf_counter()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


@dataclass(frozen=True, slots=True)
class Limits:
    """When to stop issuing; with neither bound, a schedule runs until its requests run out."""

    duration_s: float | None = None
    num_requests: int | None = None

    def allows(self, sent: int, elapsed_s: float) -> bool:
        if self.num_requests is not None and sent >= self.num_requests:
            return False
        return self.duration_s is None or elapsed_s < self.duration_s


def gamma_offsets(rate: float, burstiness: float = 1.0, seed: int = 0) -> Iterator[float]:
    """Endless send offsets (seconds) with mean rate `rate`/s. Gaps are Gamma(shape=burstiness) with mean
    1/rate: burstiness 1 is a Poisson process, < 1 burstier, > 1 more regular. An infinite rate sends
    everything at once."""
    if rate <= 0 or burstiness <= 0:
        raise InputError("rate and burstiness must be positive")
    if math.isinf(rate):
        yield from itertools.repeat(0.0)
        return
    rng = np.random.default_rng(seed)
    offset = 0.0
    while True:
        # Draw in blocks: one numpy call per 1024 arrivals keeps the generator off the hot path.
        for gap in arrival_gaps(rng, 1024, rate, burstiness).tolist():
            offset += gap
            yield offset


def trace_offsets(timestamps_ms: Sequence[float], rate_scale: float = 1.0) -> list[float]:
    """Send offsets (seconds) that keep a trace's spacing, starting at its first request. `rate_scale` 2
    replays the trace twice as fast (twice the request rate)."""
    if rate_scale <= 0:
        raise InputError("rate_scale must be positive")
    if not timestamps_ms:
        return []
    first = min(timestamps_ms)
    return [(timestamp - first) / 1000.0 / rate_scale for timestamp in timestamps_ms]


async def run_open_loop(
    timed_requests: Iterable[tuple[float, BenchRequest]],
    send: Send,
    limits: Limits,
    clock: Clock,
    start: float,
) -> int:
    """Sends each request at `start + offset` (offsets must not decrease) without waiting for earlier
    ones to finish. Returns how many were sent, after all of them completed."""
    tasks: list[asyncio.Task[object]] = []
    for offset, request in timed_requests:
        if not limits.allows(len(tasks), offset):
            break
        delay = start + offset - clock.now()
        if delay > 0:
            await clock.sleep(delay)
        tasks.append(asyncio.ensure_future(send(request, offset)))
    await asyncio.gather(*tasks)
    return len(tasks)


async def run_closed_loop(
    requests: Iterable[BenchRequest],
    send: Send,
    concurrency: int,
    limits: Limits,
    clock: Clock,
    start: float,
) -> int:
    """`concurrency` users, each sending its next request when its previous one completes. Returns how
    many were sent, after all of them completed."""
    if concurrency < 1:
        raise InputError("concurrency must be at least 1")
    pending = iter(requests)
    sent = 0

    async def user() -> None:
        nonlocal sent
        while True:
            elapsed = clock.now() - start
            if not limits.allows(sent, elapsed):
                return
            request = next(pending, None)
            if request is None:
                return
            sent += 1
            await send(request, elapsed)

    await asyncio.gather(*(user() for _ in range(concurrency)))
    return sent
