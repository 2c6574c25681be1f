"""fleetserve side by side with the peer routers, on the same emulated engines, trace and arrivals.

    python benchmarks/routers.py [--quick] [--only NAME ...] [--no-append] [--no-install]

The first run installs the peers (`benchmarks/peers/install.sh`: each in its own venv under
benchmarks/.peers/, a few minutes) unless --no-install.

Contenders: fleetserve's gateway once per registered routing policy, SGLang's router (cache_aware and
round_robin), vLLM's router (cache_aware) and LiteLLM's proxy (simple-shuffle). A peer that is not
installed, or does not start, is reported and skipped. Each router runs alone in front of one emulated
fleet (one `fleetserve engine emulate --fleet` process per experiment), in turn; between two routers the
engines are drained and their prefix caches emptied, so every router starts from the same state.
`fleetserve bench`'s `run_bench` is the load generator for everything.

1. Overhead. Engines with (nearly) zero model time. For each probed rate, an open-loop window goes
   straight to one engine and then, with the same seed (same arrivals, same prompts), through the router;
   added latency = router E2E percentile - direct E2E percentile. Reported: added p50/p99 at a fixed rate,
   and the highest rate whose added p99 stays <= 5 ms (bisection on a log scale).
2. Quality. The Mooncake conversation trace replayed by its own timestamps on a heterogeneous fleet:
   TTFT/TPOT percentiles and SLO attainment at one reference rate scale, then the capacity at 90% SLO
   attainment by bisection on the rate scale (a few probes of a short window each).

Results go to out/routers/<time>/ (JSON per window, router logs) and, unless --no-append, a section is
appended to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import astuple, dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

from common import free_ports, shared_trace
from fleetserve import __version__ as fleetserve_version
from fleetserve.bench import SLO, BenchConfig, Summary, run_bench
from fleetserve.bench.client import RequestRecord
from fleetserve.bench.metrics import Distribution, summarize
from fleetserve.model.catalog import default_catalog
from fleetserve.protocol.tokenizer import load_tokenizer
from fleetserve.routing.registry import POLICIES
from fleetserve.workload.prompts import prompt_text
from fleetserve.workload.readers import read_trace
from peers import LITELLM, SGLANG_ROUTER, VLLM_ROUTER, PeerInstall
from peers.fleetserve_gateway import FLEETSERVE, fleetserve_gateway, fleetserve_ready
from peers.litellm_proxy import litellm_proxy, litellm_ready
from peers.process import ReadyCheck, ServerFailed, ServerSpec, serving
from peers.sglang_router import sglang_ready, sglang_router
from peers.vllm_router import vllm_router, vllm_router_ready

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "docs" / "benchmarks.md"
MOONCAKE = shared_trace("mooncake_conversation.jsonl")
ADDED_P99_LIMIT_MS = 5.0
SLO_TARGET = 0.9
HOST = "127.0.0.1"


# -- settings -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OverheadSettings:
    fleet: tuple[tuple[str, int], ...]  # (gpu, replicas)
    model: str
    # The emulator takes no zero time scale: 1e-6 makes a second of model time one microsecond of wall.
    time_scale: float
    workload: str
    fixed_rate: float
    warmup_s: float  # sent at the window's rate, not measured
    window_s: float
    max_probes: int
    min_rate: float
    max_rate: float


@dataclass(frozen=True)
class QualitySettings:
    """Engines run `time_scale` times model time (0.5: twice as fast) and the trace is replayed that much
    faster, so a window holds more requests per wall second; SLO, latencies and rates are stated in model
    time, as if the engines ran at real speed."""

    fleet: tuple[tuple[str, int], ...]
    model: str
    time_scale: float
    stream_interval: int
    slo: SLO  # model time
    reference_scale: float  # x1 = the trace's own request rate
    window_s: float  # wall seconds of sending; then requests in flight finish (see `request_timeout_s`)
    max_probes: int  # capacity probes after the reference window
    min_scale: float
    max_scale: float
    trace_requests: int  # the first N requests of the trace that fit the model's context
    # Answers longer than this are cut to it: a window lasts until its longest answer is done, and on an
    # L4 a 1,000-token answer takes 50 s of model time. Prompts (the routing-relevant part) are kept.
    max_output_tokens: int

    def request_timeout_s(self, max_output_tokens: int) -> float:
        """Long enough for the longest answer to finish while meeting the SLO, so a timeout is a miss."""
        slo = self.wall_slo
        return self.window_s + ((slo.ttft_ms or 0.0) + (slo.tpot_ms or 0.0) * max_output_tokens) / 1000.0

    @property
    def wall_slo(self) -> SLO:
        scale = self.time_scale
        return SLO(
            None if self.slo.ttft_ms is None else self.slo.ttft_ms * scale,
            None if self.slo.tpot_ms is None else self.slo.tpot_ms * scale,
        )


HETEROGENEOUS = (("h100-80g", 2), ("a100-80g", 2), ("l4", 4))

FULL = (
    OverheadSettings(
        fleet=HETEROGENEOUS,
        model="qwen2.5-7b",
        time_scale=1e-6,
        workload="input=128,output=4",
        fixed_rate=100.0,
        warmup_s=0.5,
        window_s=2.0,
        max_probes=2,
        min_rate=10.0,
        max_rate=3200.0,
    ),
    QualitySettings(
        fleet=HETEROGENEOUS,
        model="qwen2.5-7b",
        time_scale=0.5,
        stream_interval=4,
        slo=SLO(ttft_ms=5000.0, tpot_ms=100.0),
        reference_scale=1.0,
        window_s=6.0,
        max_probes=2,
        min_scale=0.05,
        max_scale=8.0,
        trace_requests=400,
        max_output_tokens=300,
    ),
)
QUICK = (
    replace(FULL[0], window_s=1.0, max_probes=1),
    replace(FULL[1], window_s=4.0, max_probes=0),
)
# The quick run keeps two of fleetserve's policies (load-only and cache-aware) next to every peer.
QUICK_POLICIES = ("least_request", "prefix_aware")


# -- the emulated fleet -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fleet:
    file: Path
    model: str
    urls: tuple[str, ...]
    gpus: tuple[str, ...]


def write_fleet(
    path: Path, groups: Sequence[tuple[str, int]], model: str, time_scale: float, slo: SLO | None
) -> Fleet:
    """A fleet file the emulator starts and the gateway serves (`--no-launch`): the same engines."""
    ports = free_ports(sum(replicas for _, replicas in groups) + 1)
    engines, urls, gpus = [], [], []
    next_port = iter(ports[1:])
    for gpu, replicas in groups:
        first = next(next_port)
        group_ports = [first] + [next(next_port) for _ in range(replicas - 1)]
        # Replicas of a group take consecutive ports in the fleet file; free ports need not be, so
        # every engine gets its own one-replica group.
        for index, port in enumerate(group_ports):
            engines.append(
                {"name": f"{gpu}-{index}", "gpu": gpu, "model": model, "port": port, "time_scale": time_scale}
            )
            urls.append(f"http://{HOST}:{port}")
            gpus.append(gpu)
    config: dict[str, Any] = {"engines": engines, "gateway": {"host": HOST, "port": ports[0]}}
    if slo is not None and slo.ttft_ms is not None and slo.tpot_ms is not None:
        config["slo"] = {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return Fleet(path, model, tuple(urls), tuple(gpus))


def emulator_spec(fleet: Fleet, stream_interval: int) -> ServerSpec:
    argv = [str(FLEETSERVE), "engine", "emulate", "--fleet", str(fleet.file)]
    argv += ["--stream-interval", str(stream_interval)]
    return ServerSpec("emulated fleet", argv, fleet.urls[0])


def fleet_ready(fleet: Fleet) -> ReadyCheck:
    async def check(session: aiohttp.ClientSession, _: str) -> bool:
        for url in fleet.urls:
            async with session.get(url + "/health") as response:
                if response.status != 200:
                    return False
        return True

    return check


async def _engine_load(session: aiohttp.ClientSession, url: str) -> float:
    async with session.get(url + "/metrics") as response:
        text = await response.text()
    load = 0.0
    for line in text.splitlines():
        if line.startswith(("vllm:num_requests_running{", "vllm:num_requests_waiting{")):
            load += float(line.rsplit(" ", 1)[1])
    return load


async def quiesce(fleet: Fleet, timeout_s: float = 90.0) -> bool:
    """Wait until no engine runs or queues a request, then empty every prefix cache (vLLM's
    /reset_prefix_cache), so the next router starts on cold, idle engines. False if either failed."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        while True:
            loads = [await _engine_load(session, url) for url in fleet.urls]
            if not any(loads):
                break
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.2)
        reset = True
        for url in fleet.urls:
            async with session.post(url + "/reset_prefix_cache") as response:
                reset = reset and response.status == 200
        return reset


# -- contenders ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Contender:
    name: str
    family: str
    version: str | None
    launch: Callable[[Fleet, int, Path], ServerSpec]
    ready: Callable[[Fleet], ReadyCheck]
    missing: str | None = None  # why it cannot run here


def _peer(
    install: PeerInstall,
    name: str,
    launch: Callable[[Fleet, int, Path], ServerSpec],
    ready: Callable[[Fleet], ReadyCheck],
) -> Contender:
    version = install.version()
    missing = None if version else f"not installed: run `bash benchmarks/peers/install.sh` ({install.binary})"
    return Contender(name, install.distribution, version, launch, ready, missing)


def contenders(policies: Sequence[str] | None = None) -> list[Contender]:
    out = [
        Contender(
            f"fleetserve {policy}",
            "fleetserve",
            fleetserve_version,
            lambda fleet, port, _, policy=policy: fleetserve_gateway(fleet.file, policy, port),
            lambda fleet: fleetserve_ready(fleet.model, len(fleet.urls)),
        )
        for policy in sorted(POLICIES)
        if policies is None or policy in policies
    ]
    for policy in ("cache_aware", "round_robin"):
        out.append(
            _peer(
                SGLANG_ROUTER,
                f"sglang-router {policy}",
                lambda fleet, port, _, policy=policy: sglang_router(fleet.urls, policy, port),
                lambda fleet: sglang_ready(fleet.model),
            )
        )
    out.append(
        _peer(
            VLLM_ROUTER,
            "vllm-router cache_aware",
            lambda fleet, port, _: vllm_router(fleet.urls, "cache_aware", port),
            lambda fleet: vllm_router_ready(fleet.model),
        )
    )
    out.append(
        _peer(
            LITELLM,
            "litellm simple-shuffle",
            lambda fleet, port, workdir: litellm_proxy(
                fleet.model, fleet.urls, "simple-shuffle", port, workdir / "litellm.yaml"
            ),
            lambda fleet: litellm_ready(fleet.model),
        )
    )
    return out


# -- bisection ----------------------------------------------------------------------------------------


class Verdict(Enum):
    PASS = "pass"
    FAIL = "fail"
    CEILING = "ceiling"  # the setup itself (load generator, emulator) cannot go this fast


@dataclass
class Bisection:
    best: float | None = None  # highest value that passed
    first_fail: float | None = None  # lowest value that failed
    ceiling: float | None = None  # lowest value the setup itself could not serve
    probes: list[tuple[float, str]] = field(default_factory=list)


async def bisect_max(
    probe: Callable[[float], Awaitable[Verdict]],
    start: float,
    low: float,
    high: float,
    max_probes: int,
    first: Verdict | None = None,
    growth: float = 2.0,
) -> Bisection:
    """The highest value in [low, high] that passes, on a log scale: multiply (or divide) `start` by
    `growth` until the verdict flips, then split the gap geometrically. `first` is a verdict already known
    for `start`."""
    result = Bisection()
    value = start
    for step in range(max_probes + (first is not None)):
        verdict = first if step == 0 and first is not None else await probe(value)
        result.probes.append((value, verdict.value))
        if verdict is Verdict.PASS:
            result.best = value
        elif verdict is Verdict.CEILING:
            result.ceiling = value
        else:
            result.first_fail = value
        upper = result.first_fail if result.first_fail is not None else result.ceiling
        if result.best is not None and upper is not None:
            if upper / result.best <= 1.25:
                break
            value = math.sqrt(result.best * upper)
        elif result.best is not None:
            value = result.best * growth
        else:
            value = upper / growth if upper is not None else value / growth
        if not low <= value <= high:
            break
    return result


# -- experiment 1: overhead ---------------------------------------------------------------------------


@dataclass
class OverheadWindow:
    rate: float
    direct: Summary
    routed: Summary

    @property
    def added_p50(self) -> float | None:
        return _difference(self.routed.e2e_ms.median, self.direct.e2e_ms.median)

    @property
    def added_p99(self) -> float | None:
        return _difference(self.routed.e2e_ms.p99, self.direct.e2e_ms.p99)


@dataclass
class OverheadResult:
    contender: str
    fixed: OverheadWindow | None = None
    bisection: Bisection | None = None
    windows: list[OverheadWindow] = field(default_factory=list)
    error: str | None = None


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _setup_overloaded(summary: Summary, rate: float) -> bool:
    # Direct to an engine: failures, or sends late by more than a request interval, mean the load
    # generator or the emulator (not the router) is the limit at this rate.
    lag = summary.send_lag_ms.p99 or 0.0
    return summary.failed > 0 or lag > max(5.0, 1000.0 / rate)


async def overhead(
    contender: Contender, fleet: Fleet, settings: OverheadSettings, workdir: Path
) -> OverheadResult:
    result = OverheadResult(contender.name)

    async def window(url: str, rate: float, label: str) -> Summary:
        config = BenchConfig(
            url=url,
            model=fleet.model,
            workload=settings.workload,
            rate=rate,
            duration_s=settings.warmup_s + settings.window_s,
            seed=int(rate),  # the same arrivals and prompts for the direct and the routed window
            timeout_s=30.0,
            label=label,
        )
        bench = await run_bench(config)
        bench.write_json(workdir / f"{_slug(label)}.json")
        # Idle keep-alive connections are closed between windows (uvicorn drops them after 5 s); the
        # warm-up lets every hop reopen its pool, so the figures are steady-state per-request costs.
        measured = [record for record in bench.records if record.scheduled_at >= settings.warmup_s]
        return summarize(measured, settings.window_s)

    async def probe(rate: float) -> Verdict:
        direct = await window(fleet.urls[0], rate, f"overhead direct {contender.name} {rate:.0f}")
        routed = await window(url, rate, f"overhead {contender.name} {rate:.0f}")
        measured = OverheadWindow(rate, direct, routed)
        result.windows.append(measured)
        added = measured.added_p99
        print(
            f"  {rate:7.1f} req/s: added p50 {_ms(measured.added_p50)} p99 {_ms(added)} ms "
            f"(direct p99 {_ms(direct.e2e_ms.p99)}), router failed {routed.failed}/{routed.sent}",
            flush=True,
        )
        if _setup_overloaded(direct, rate):
            return Verdict.CEILING
        if routed.failed or added is None or added > ADDED_P99_LIMIT_MS:
            return Verdict.FAIL
        return Verdict.PASS

    port = free_ports(1)[0]
    spec = contender.launch(fleet, port, workdir)
    url = spec.url
    try:
        async with serving(spec, workdir / f"{_slug(contender.name)}-overhead.log", contender.ready(fleet)):
            first = await probe(settings.fixed_rate)
            result.fixed = result.windows[-1]
            result.bisection = await bisect_max(
                probe,
                settings.fixed_rate,
                settings.min_rate,
                settings.max_rate,
                settings.max_probes,
                first=first,
            )
    except ServerFailed as error:
        result.error = str(error).splitlines()[0]
        print(f"  {contender.name}: {error}", flush=True)
    finally:
        await quiesce(fleet)
    return result


# -- experiment 2: quality ----------------------------------------------------------------------------


@dataclass
class QualityWindow:
    scale: float
    rate: float  # offered requests per second
    summary: Summary | None  # None when the window was cut short
    attainment: float  # share of the requests due in the window that met the SLO
    cut_short: bool


@dataclass
class QualityResult:
    contender: str
    reference: QualityWindow | None = None
    bisection: Bisection | None = None
    windows: list[QualityWindow] = field(default_factory=list)
    error: str | None = None

    def capacity(self, base_rate: float) -> float | None:
        if self.bisection is None or self.bisection.best is None:
            return None
        return self.bisection.best * base_rate


class _SLOTally:
    """Counts SLO hits and misses while a window runs; sets `decided` once the window can no longer reach
    the target, so it can be cut short."""

    def __init__(self, slo: SLO, expected: int) -> None:
        self.slo = slo
        self.decided = asyncio.Event()
        self.allowed_misses = math.floor((1.0 - SLO_TARGET) * expected)
        self.met = self.misses = 0

    def request_sent(self) -> None:
        pass

    def request_done(self, record: RequestRecord) -> None:
        if self.slo.met_by(record):
            self.met += 1
            return
        self.misses += 1
        if self.misses > self.allowed_misses:
            self.decided.set()


def in_model_time(summary: Summary, time_scale: float) -> Summary:
    """The summary's latencies as they would be on engines running at real speed."""

    def scaled(distribution: Distribution) -> Distribution:
        return Distribution(
            distribution.count,
            *(None if value is None else value / time_scale for value in astuple(distribution)[1:]),
        )

    return replace(
        summary,
        ttft_ms=scaled(summary.ttft_ms),
        tpot_ms=scaled(summary.tpot_ms),
        itl_ms=scaled(summary.itl_ms),
        e2e_ms=scaled(summary.e2e_ms),
    )


def prepare_trace(
    source: Path, model: str, count: int, max_output_tokens: int, path: Path
) -> tuple[Path, float]:
    """The first `count` requests of the trace that the model can take, answers cut to
    `max_output_tokens`, written to `path`; returns it and their mean request rate (req/s). A request
    fits when its prompt, as the emulated engine counts the text the load generator builds for it, plus
    its output stays within the model's context (the engine's tokenizer counts that text longer than the
    trace's input_length)."""
    spec = default_catalog().model(model)
    tokenizer = load_tokenizer(spec.vocab_size, None)
    kept = []
    for request in read_trace(source):
        request.output_length = min(request.output_length, max_output_tokens)
        prompt = prompt_text(request, index=len(kept), seed=0)
        if len(tokenizer.encode(prompt)) + request.output_length <= spec.max_context:
            kept.append(request)
            if len(kept) == count:
                break
    with path.open("wb") as out:
        for request in kept:
            out.write(orjson.dumps(request.to_json_dict()) + b"\n")
    span_s = (kept[-1].timestamp_ms - kept[0].timestamp_ms) / 1000.0
    return path, len(kept) / span_s


def expected_requests(trace: Path, replay_speed: float, window_s: float) -> int:
    stamps = sorted(r.timestamp_ms for r in read_trace(trace))
    return sum(1 for stamp in stamps if (stamp - stamps[0]) / 1000.0 / replay_speed < window_s)


async def quality(
    contender: Contender,
    fleet: Fleet,
    settings: QualitySettings,
    trace: Path,
    base_rate: float,
    workdir: Path,
) -> QualityResult:
    result = QualityResult(contender.name)

    async def probe(scale: float) -> Verdict:
        """One window at `scale`. The reference window always runs to the end (its percentiles are
        reported); a capacity probe is cancelled as soon as it cannot reach the target any more."""
        reference = not result.windows
        label = f"quality {contender.name} x{scale:.3g}"
        replay_speed = scale / settings.time_scale
        slo = settings.wall_slo
        expected = expected_requests(trace, replay_speed, settings.window_s)
        tally = _SLOTally(slo, expected)
        config = BenchConfig(
            url=url,
            model=fleet.model,
            trace=trace,
            rate_scale=replay_speed,
            duration_s=settings.window_s,
            slo=slo,
            timeout_s=settings.request_timeout_s(max_output),
            label=label,
        )
        bench_task = asyncio.create_task(run_bench(config, observer=tally))
        if not reference:
            decided = asyncio.create_task(tally.decided.wait())
            await asyncio.wait({bench_task, decided}, return_when=asyncio.FIRST_COMPLETED)
            decided.cancel()
            if not bench_task.done():
                bench_task.cancel()  # closing the connections makes routers and engines abort too
                with contextlib.suppress(asyncio.CancelledError):
                    await bench_task
                print(f"  x{scale:.3g} ({scale * base_rate:.2f} req/s): below {SLO_TARGET:.0%}, cut short")
                result.windows.append(QualityWindow(scale, scale * base_rate, None, 0.0, True))
                await quiesce(fleet)
                return Verdict.FAIL
        bench = await bench_task
        bench.write_json(workdir / f"{_slug(label)}.json")
        # Requests due in the window but never sent or never finished count as misses.
        attainment = tally.met / max(expected, len(bench.records), 1)
        summary = in_model_time(bench.summary, settings.time_scale)
        result.windows.append(QualityWindow(scale, scale * base_rate, summary, attainment, False))
        print(
            f"  x{scale:.3g} ({scale * base_rate:.2f} req/s): SLO {attainment:.0%} of {expected}, "
            f"TTFT p50 {_ms(summary.ttft_ms.median)} p99 {_ms(summary.ttft_ms.p99)} ms, "
            f"TPOT p50 {_ms(summary.tpot_ms.median)} ms, failed {summary.failed}",
            flush=True,
        )
        await quiesce(fleet)
        return Verdict.PASS if attainment >= SLO_TARGET else Verdict.FAIL

    max_output = max(request.output_length for request in read_trace(trace))
    port = free_ports(1)[0]
    spec = contender.launch(fleet, port, workdir)
    url = spec.url
    try:
        async with serving(spec, workdir / f"{_slug(contender.name)}-quality.log", contender.ready(fleet)):
            await quiesce(fleet)  # the readiness probe's request left a prefix behind
            first = await probe(settings.reference_scale)
            result.reference = result.windows[-1]
            result.bisection = await bisect_max(
                probe,
                settings.reference_scale,
                settings.min_scale,
                settings.max_scale,
                settings.max_probes,
                first=first,
            )
    except ServerFailed as error:
        result.error = str(error).splitlines()[0]
        print(f"  {contender.name}: {error}", flush=True)
    finally:
        await quiesce(fleet)
    return result


# -- report -------------------------------------------------------------------------------------------


def _ms(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in text)


def _rate_cell(bisection: Bisection | None) -> str:
    if bisection is None:
        return "-"
    if bisection.best is None:
        low = min(value for value, _ in bisection.probes)
        return f"< {low:.3g}"
    text = f"{bisection.best:.3g}"
    if bisection.first_fail is None:
        # Never failed: either the setup's ceiling or the search's upper bound stopped it.
        text = f">= {text}"
    return text


def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} CPUs (nproc), {model}, Python {platform.python_version()}"


def best_of(values: dict[str, float | None], higher_is_better: bool) -> tuple[str, float] | None:
    known = {name: value for name, value in values.items() if value is not None}
    if not known:
        return None
    pick = max if higher_is_better else min
    name = pick(known, key=lambda n: known[n])
    return name, known[name]


def comparison(metric: str, values: dict[str, float | None], higher_is_better: bool, unit: str) -> str:
    """One plain sentence: fleetserve's best against the best peer on one metric."""
    ours = best_of({n: v for n, v in values.items() if n.startswith("fleetserve")}, higher_is_better)
    theirs = best_of({n: v for n, v in values.items() if not n.startswith("fleetserve")}, higher_is_better)
    if ours is None or theirs is None:
        return f"- {metric}: not comparable (a side has no figure)."
    if theirs[1] <= 0 or ours[1] <= 0:
        # An added latency at or below zero is within the noise of the direct baseline: no ratio.
        ratio_text = "n/a (a value <= 0 is within noise)"
    else:
        ratio_text = f"{ours[1] / theirs[1]:.2f}x"
    better = ours[1] > theirs[1] if higher_is_better else ours[1] < theirs[1]
    tie = ours[1] == theirs[1]
    outcome = "tie" if tie else ("fleetserve wins" if better else "fleetserve LOSES")
    return (
        f"- {metric}: best fleetserve ({ours[0]}) {ours[1]:,.3g} {unit} vs best peer ({theirs[0]}) "
        f"{theirs[1]:,.3g} {unit}: ratio fleetserve/peer {ratio_text} ({outcome})."
    )


def report(
    args: argparse.Namespace,
    settings: tuple[OverheadSettings, QualitySettings],
    all_contenders: list[Contender],
    overhead_results: list[OverheadResult],
    quality_results: list[QualityResult],
    base_rate: float,
    started: float,
) -> str:
    over, qual = settings
    date = subprocess.run(["date", "-u"], capture_output=True, text=True, check=False).stdout.strip()
    fleet_text = ", ".join(f"{n} x {gpu}" for gpu, n in qual.fleet)
    lines = [
        f"## Side by side: fleetserve vs peer routers{' (quick)' if args.quick else ''}",
        "",
        f"- date: {date}",
        f"- machine: {machine()} (shared with other jobs: expect noise; one run per point, no medians)",
        f"- command: `python benchmarks/routers.py{' --quick' if args.quick else ''}"
        f"{' --only ' + ' '.join(args.only) if args.only else ''}`"
        " (installs missing peers with `benchmarks/peers/install.sh` first)",
        f"- wall time: {(time.monotonic() - started) / 60:.1f} min",
        "- versions: "
        + ", ".join(sorted({f"{c.family} {c.version}" for c in all_contenders if c.version is not None})),
        "- not run: " + (", ".join(f"{c.name} ({c.missing})" for c in all_contenders if c.missing) or "none"),
        "",
    ]
    if overhead_results:
        lines += [
            f"### Overhead (engines with zero model time: {over.model} on {fleet_text}, "
            f"--time-scale {over.time_scale:g})",
            "",
            f"Open-loop Poisson `{over.workload}` streaming completions; each rate measured straight to an "
            f"engine and then through the router with the same arrivals ({over.window_s:g} s windows). "
            f"Added = router E2E percentile minus direct E2E percentile (ms). Max rate: highest probed "
            f"rate with added p99 <= {ADDED_P99_LIMIT_MS:g} ms and no failures (log bisection, at most "
            f"{over.max_probes + 1} probes; `>=` = the search or the load generator stopped first).",
            "",
            f"| router | added p50 @ {over.fixed_rate:g} req/s | added p99 @ {over.fixed_rate:g} req/s "
            f"| max req/s (p99 added <= {ADDED_P99_LIMIT_MS:g} ms) | probes (req/s: verdict) |",
            "|---|---|---|---|---|",
        ]
        for result in overhead_results:
            if result.error:
                lines.append(f"| {result.contender} | - | - | - | failed: {result.error} |")
                continue
            fixed = result.fixed
            probes = ", ".join(
                f"{v:.0f}: {verdict}" for v, verdict in (result.bisection or Bisection()).probes
            )
            lines.append(
                f"| {result.contender} | {_ms(fixed.added_p50 if fixed else None)} "
                f"| {_ms(fixed.added_p99 if fixed else None)} | {_rate_cell(result.bisection)} | {probes} |"
            )
        lines += ["", "Fleetserve against the best peer:", ""]
        lines.append(
            comparison(
                f"added p50 at {over.fixed_rate:g} req/s",
                {r.contender: r.fixed.added_p50 if r.fixed else None for r in overhead_results},
                higher_is_better=False,
                unit="ms",
            )
        )
        lines.append(
            comparison(
                f"added p99 at {over.fixed_rate:g} req/s",
                {r.contender: r.fixed.added_p99 if r.fixed else None for r in overhead_results},
                higher_is_better=False,
                unit="ms",
            )
        )
        lines.append(
            comparison(
                f"max rate with added p99 <= {ADDED_P99_LIMIT_MS:g} ms",
                {r.contender: r.bisection.best if r.bisection else None for r in overhead_results},
                higher_is_better=True,
                unit="req/s",
            )
        )
        lines.append("")
    if quality_results:
        slo = qual.slo
        lines += [
            f"### Quality (Mooncake conversation trace on {fleet_text}, {qual.model})",
            "",
            f"Trace: the first {qual.trace_requests} requests of {args.trace.name} (kvcache-ai/Mooncake, "
            f"Apache-2.0) that fit the model's context, answers cut to {qual.max_output_tokens} tokens, "
            f"replayed by their timestamps (base rate "
            f"{base_rate:.2f} req/s = x1; x2 = twice as fast), streaming completions with the trace's "
            f"input/output lengths and shared prefixes, {qual.window_s:g} s of sending per window. To fit "
            f"this machine the engines run at time scale {qual.time_scale:g} (every model duration x "
            f"{qual.time_scale:g}) and the trace is replayed that much faster; SLO, latencies and rates "
            f"below are in model time (wall / {qual.time_scale:g}), i.e. as on real-speed engines. "
            f"SLO: TTFT <= {slo.ttft_ms:g} ms and TPOT <= {slo.tpot_ms:g} ms; attainment = share of "
            f"the requests due in the window that met both (failures and unsent requests miss). "
            f"Percentiles (ms) at the reference scale x{qual.reference_scale:g}. Capacity: highest rate "
            f"with attainment >= {SLO_TARGET:.0%} (log bisection on the rate scale, {qual.max_probes} "
            f"probes after the reference; a window that can no longer reach {SLO_TARGET:.0%} is cut "
            f"short).",
            "",
            "| router | TTFT p50 | TTFT p90 | TTFT p99 | TPOT p50 | TPOT p90 | TPOT p99 | SLO attainment "
            "| capacity @ 90% SLO (req/s) | probes (scale: verdict) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for result in quality_results:
            if result.error or result.reference is None:
                lines.append(
                    f"| {result.contender} | - | - | - | - | - | - | - | - | failed: {result.error} |"
                )
                continue
            summary = result.reference.summary
            assert summary is not None  # the reference window always runs to the end
            capacity = result.capacity(base_rate)
            capacity_text = _rate_cell(
                None
                if result.bisection is None
                else replace(
                    result.bisection,
                    best=capacity,
                    probes=[(v * base_rate, verdict) for v, verdict in result.bisection.probes],
                )
            )
            probes = ", ".join(
                f"x{v:.3g}: {verdict}" for v, verdict in (result.bisection or Bisection()).probes
            )
            lines.append(
                f"| {result.contender} | {_ms(summary.ttft_ms.median, 0)} | {_ms(summary.ttft_ms.p90, 0)} "
                f"| {_ms(summary.ttft_ms.p99, 0)} | {_ms(summary.tpot_ms.median, 1)} "
                f"| {_ms(summary.tpot_ms.p90, 1)} | {_ms(summary.tpot_ms.p99, 1)} "
                f"| {result.reference.attainment:.0%} | {capacity_text} | {probes} |"
            )
        lines += ["", "Fleetserve against the best peer:", ""]
        reference = {r.contender: r.reference for r in quality_results}
        lines.append(
            comparison(
                f"SLO attainment at x{qual.reference_scale:g}",
                {n: w.attainment * 100 if w else None for n, w in reference.items()},
                higher_is_better=True,
                unit="%",
            )
        )
        lines.append(
            comparison(
                "TTFT p99",
                {n: w.summary.ttft_ms.p99 if w and w.summary else None for n, w in reference.items()},
                higher_is_better=False,
                unit="ms",
            )
        )
        lines.append(
            comparison(
                "TPOT p99",
                {n: w.summary.tpot_ms.p99 if w and w.summary else None for n, w in reference.items()},
                higher_is_better=False,
                unit="ms",
            )
        )
        lines.append(
            comparison(
                "capacity at 90% SLO attainment",
                {r.contender: r.capacity(base_rate) for r in quality_results},
                higher_is_better=True,
                unit="req/s",
            )
        )
        lines.append("")
    return "\n".join(lines) + "\n"


# -- main ---------------------------------------------------------------------------------------------


def select(all_contenders: list[Contender], only: Sequence[str] | None) -> list[Contender]:
    if not only:
        return all_contenders
    chosen = [c for c in all_contenders if any(word in c.name for word in only)]
    if not chosen:
        names = ", ".join(c.name for c in all_contenders)
        raise SystemExit(f"--only matched no router; routers: {names}")
    return chosen


async def main(args: argparse.Namespace) -> None:
    started = time.monotonic()
    settings = QUICK if args.quick else FULL
    over, qual = settings
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    workdir = ROOT / "out" / "routers" / stamp
    workdir.mkdir(parents=True, exist_ok=True)
    all_contenders = contenders(QUICK_POLICIES if args.quick else None)
    if not args.no_install and any(c.missing for c in select(all_contenders, args.only)):
        print("installing the peer routers: bash benchmarks/peers/install.sh", flush=True)
        subprocess.run(["bash", str(Path(__file__).with_name("peers") / "install.sh")], check=True)
        all_contenders = contenders(QUICK_POLICIES if args.quick else None)
    chosen = select(all_contenders, args.only)
    runnable = [c for c in chosen if c.missing is None]
    for contender in chosen:
        if contender.missing:
            print(f"skipping {contender.name}: {contender.missing}", flush=True)
    print(f"routers: {', '.join(c.name for c in runnable)}; output in {workdir}", flush=True)

    overhead_results: list[OverheadResult] = []
    if not args.skip_overhead:
        fleet = write_fleet(workdir / "fleet-overhead.yaml", over.fleet, over.model, over.time_scale, None)
        async with serving(emulator_spec(fleet, 1), workdir / "emulator-overhead.log", fleet_ready(fleet)):
            for contender in runnable:
                print(f"overhead: {contender.name}", flush=True)
                overhead_results.append(await overhead(contender, fleet, over, workdir))

    quality_results: list[QualityResult] = []
    base_rate = 0.0
    if not args.skip_quality:
        trace, base_rate = prepare_trace(
            args.trace,
            qual.model,
            qual.trace_requests,
            qual.max_output_tokens,
            workdir / "mooncake-fitting.jsonl",
        )
        fleet = write_fleet(workdir / "fleet-quality.yaml", qual.fleet, qual.model, qual.time_scale, qual.slo)
        emulator = emulator_spec(fleet, qual.stream_interval)
        log, ready = workdir / "emulator-quality.log", fleet_ready(fleet)
        remaining = list(runnable)
        async with serving(emulator, log, ready):
            resettable = await quiesce(fleet)
            while resettable and remaining:
                contender = remaining.pop(0)
                print(f"quality: {contender.name}", flush=True)
                quality_results.append(await quality(contender, fleet, qual, trace, base_rate, workdir))
        if remaining:
            # Without /reset_prefix_cache a router would inherit the previous one's warm caches.
            print("engines cannot reset their prefix caches: a fresh fleet for each router", flush=True)
        for contender in remaining:
            async with serving(emulator, log, ready):
                print(f"quality: {contender.name}", flush=True)
                quality_results.append(await quality(contender, fleet, qual, trace, base_rate, workdir))

    text = report(args, settings, chosen, overhead_results, quality_results, base_rate, started)
    print(text)
    (workdir / "report.md").write_text(text)
    if not args.no_append:
        with REPORT.open("a") as out:
            out.write("\n" + text)
        print(f"appended to {REPORT}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few minutes")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="routers whose name contains NAME")
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--no-append", action="store_true", help="do not append to docs/benchmarks.md")
    parser.add_argument("--no-install", action="store_true", help="skip peers that are not installed")
    parser.add_argument(
        "--trace", type=Path, default=MOONCAKE, help=f"the Mooncake conversation trace [default: {MOONCAKE}]"
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    if not arguments.trace.is_file():
        sys.exit(f"missing trace {arguments.trace}: pass --trace or set FLEETSERVE_SHARED_DATA")
    asyncio.run(main(arguments))
