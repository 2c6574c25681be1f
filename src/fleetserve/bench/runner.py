"""A whole benchmark run: build the requests, drive the schedule, collect records, summarise.

`run_bench(BenchConfig(...))` is the library entry point (the CLI and tests call it):

    result = await run_bench(BenchConfig(url="http://127.0.0.1:8000", model="m",
                                         workload="input=128,output=32", concurrency=8, num_requests=100))
    result.summary.completed, result.to_json_dict()
"""

from __future__ import annotations

import asyncio
import datetime
import math
from collections.abc import Coroutine, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import orjson

from fleetserve.bench.arrivals import (
    Clock,
    Limits,
    WallClock,
    gamma_offsets,
    run_closed_loop,
    run_open_loop,
    trace_offsets,
)
from fleetserve.bench.client import BenchRequest, Endpoint, RequestRecord, StreamingClient
from fleetserve.bench.metrics import SLO, Summary, record_to_dict, summarize
from fleetserve.bench.synthetic import parse_workload
from fleetserve.errors import InputError
from fleetserve.workload.prompts import prompt_text
from fleetserve.workload.readers import read_trace
from fleetserve.workload.trace import TraceRequest

T = TypeVar("T")

REPORT_VERSION = 1
SHORT_SLEEP_S = 0.05


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """What to send, how fast, and for how long. Requests come from `trace` or from `workload` (a
    synthetic spec, see `fleetserve.bench.synthetic`). Arrivals: `concurrency` (closed loop) or `rate`
    (open loop, Poisson/Gamma) or, for a trace with neither, the trace's own timestamps sped up by
    `rate_scale`."""

    url: str
    model: str
    trace: str | Path | None = None
    workload: str | None = None
    rate: float | None = None
    burstiness: float = 1.0
    concurrency: int | None = None
    rate_scale: float = 1.0
    duration_s: float | None = None
    num_requests: int | None = None
    endpoint: Endpoint = "completions"
    slo: SLO = field(default_factory=SLO)
    timeout_s: float = 600.0
    seed: int = 0
    api_key: str | None = None
    label: str | None = None

    @property
    def arrival_mode(self) -> str:
        if self.concurrency is not None:
            return "closed_loop"
        return "rate" if self.rate is not None else "trace"

    def validate(self) -> None:
        if (self.trace is None) == (self.workload is None):
            raise InputError("give exactly one of a trace or a workload spec")
        if self.rate is not None and self.concurrency is not None:
            raise InputError("give a rate (open loop) or a concurrency (closed loop), not both")
        if self.workload is not None and self.rate is None and self.concurrency is None:
            raise InputError("a synthetic workload needs a rate or a concurrency")
        if self.workload is not None and self.duration_s is None and self.num_requests is None:
            raise InputError("a synthetic workload is endless: give a duration or a number of requests")
        if self.trace is not None and not Path(self.trace).is_file():
            raise InputError(f"trace {self.trace} does not exist")
        if self.rate is not None and math.isinf(self.rate) and self.num_requests is None:
            raise InputError("an infinite rate sends everything at once: give a number of requests")
        if self.workload is not None:
            parse_workload(self.workload)

    def to_json_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["trace"] = None if self.trace is None else str(self.trace)
        data["slo"] = {"ttft_ms": self.slo.ttft_ms, "tpot_ms": self.slo.tpot_ms}
        data["arrival_mode"] = self.arrival_mode
        data.pop("api_key")
        return data


class ProgressObserver(Protocol):
    def request_sent(self) -> None: ...

    def request_done(self, record: RequestRecord) -> None: ...


@dataclass(slots=True)
class BenchResult:
    config: BenchConfig
    started_at: str  # ISO 8601, UTC
    records: list[RequestRecord]
    summary: Summary
    interrupted: bool = False

    def to_json_dict(self) -> dict[str, object]:
        return {
            "version": REPORT_VERSION,
            "label": self.config.label,
            "started_at": self.started_at,
            "interrupted": self.interrupted,
            "config": self.config.to_json_dict(),
            "summary": self.summary.to_dict(),
            "requests": [record_to_dict(record) for record in sorted(self.records, key=lambda r: r.index)],
        }

    def write_json(self, path: str | Path) -> None:
        Path(path).write_bytes(orjson.dumps(self.to_json_dict(), option=orjson.OPT_INDENT_2))


async def run_bench(
    config: BenchConfig,
    observer: ProgressObserver | None = None,
    clock: Clock | None = None,
    stop: asyncio.Event | None = None,
) -> BenchResult:
    """Runs one benchmark. Setting `stop` ends it early, as a duration would: nothing new is sent,
    requests in flight finish, and the result is marked `interrupted`."""
    config.validate()
    stop = stop or asyncio.Event()
    clock = _Interruptible(clock or WallClock(), stop)
    limits = Limits(config.duration_s, config.num_requests)
    trace = _source(config)
    records: list[RequestRecord] = []
    started_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    async with StreamingClient(config.url, config.endpoint, config.timeout_s, config.api_key) as client:
        start = clock.now()

        async def send(request: BenchRequest, scheduled_at: float) -> None:
            if stop.is_set():
                return  # a schedule woken early by `stop` still hands over its next request
            record = RequestRecord(request.index, request.input_tokens, request.max_tokens, scheduled_at)
            if observer is not None:
                observer.request_sent()
            await client.send(request, record, start)
            records.append(record)
            if observer is not None:
                observer.request_done(record)

        if config.arrival_mode == "closed_loop":
            assert config.concurrency is not None
            requests = _until(stop, _bench_requests(trace, config))
            await run_closed_loop(requests, send, config.concurrency, limits, clock, start)
        else:
            if config.arrival_mode == "rate":
                assert config.rate is not None
                offsets: Iterable[float] = gamma_offsets(config.rate, config.burstiness, config.seed)
            else:
                assert isinstance(trace, list)
                offsets = trace_offsets([request.timestamp_ms for request in trace], config.rate_scale)
            timed = zip(offsets, _until(stop, _bench_requests(trace, config)), strict=False)
            await run_open_loop(timed, send, limits, clock, start)
        duration = clock.now() - start
    summary = summarize(records, duration, config.slo)
    return BenchResult(config, started_at, records, summary, interrupted=stop.is_set())


def run_sync(coroutine: Coroutine[Any, Any, T], use_uvloop: bool = True) -> T:
    """Runs `coroutine` to completion, on uvloop when installed (it comes with uvicorn[standard]);
    `benchmarks/loadgen_ceiling.py --asyncio` measures the difference."""
    try:
        import uvloop
    except ImportError:
        use_uvloop = False
    if not use_uvloop:
        return asyncio.run(coroutine)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)


class _Interruptible:
    """A clock whose sleeps end early once `stop` is set, so an open loop waiting for a sparse trace's
    next request notices a stop at once."""

    def __init__(self, clock: Clock, stop: asyncio.Event) -> None:
        self._clock, self._stop = clock, stop

    def now(self) -> float:
        return self._clock.now()

    async def sleep(self, seconds: float) -> None:
        if self._stop.is_set():
            return
        if seconds < SHORT_SLEEP_S:
            await self._clock.sleep(seconds)  # noticing a stop this much later is fine, and cheaper
            return
        stopped = asyncio.ensure_future(self._stop.wait())
        slept = asyncio.ensure_future(self._clock.sleep(seconds))
        await asyncio.wait({stopped, slept}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        slept.cancel()


def _until(stop: asyncio.Event, requests: Iterator[BenchRequest]) -> Iterator[BenchRequest]:
    for request in requests:
        if stop.is_set():
            return
        yield request


def _source(config: BenchConfig) -> Iterable[TraceRequest]:
    if config.workload is not None:
        return parse_workload(config.workload).requests(config.seed)
    assert config.trace is not None
    requests = read_trace(config.trace)
    # Trace mode sends in timestamp order; a stable sort keeps ties in file order.
    return sorted(requests, key=lambda request: request.timestamp_ms)


def _bench_requests(trace: Iterable[TraceRequest], config: BenchConfig) -> Iterator[BenchRequest]:
    """Lazily: an endless synthetic source or a long trace's prompts would not fit in memory. A prompt is
    built between one send and the sleep until the next (a vectorised lookup, well under a millisecond
    for thousands of tokens); if that ever made sends late, the report's send lag would show it."""
    for index, request in enumerate(trace):
        yield BenchRequest(
            index=index,
            prompt=prompt_text(request, index=index, seed=config.seed),
            input_tokens=request.input_length,
            max_tokens=max(request.output_length, 1),
            # vLLM serves a LoRA adapter under its own model name.
            model=request.adapter or config.model,
            tenant=request.tenant,
        )
