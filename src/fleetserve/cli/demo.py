"""`fleetserve demo`: a heterogeneous fleet behind the gateway, a burst of traffic through it, what each
engine did, and then the fleet keeps serving so you can talk to it.

1. Start the packaged fleet (`data/demo_fleet.yaml`: 2 x H100, 2 x A100, 4 x L4 emulated engines
   serving llama-3-8b) and the gateway in this process, on the loop that also drives the replay.
2. Replay the packaged demo trace (`data/demo_trace.jsonl`) through the gateway with `run_bench`, sped
   up by `--rate-scale`, with a live view of the fleet.
3. Print one row per engine (requests from the gateway's own counters; tokens, TTFT and prefix hits
   from the engine's `/metrics`; the highest KV usage the gateway scraped) and a one-line summary.
4. Serve until Ctrl-C (or exit at once with `--exit`).

`--real` runs llama.cpp servers with SmolLM2-135M instead, so answers are real text; CPU inference is
slow, so it sends a few short synthetic requests instead of the trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import socket
import sys
import tempfile
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import aiohttp
import click
import uvloop
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fleetserve.bench import SLO, BenchConfig, BenchResult, run_bench
from fleetserve.bench.client import RequestRecord
from fleetserve.cli.console import make_console
from fleetserve.config import ConfigError, EngineGroup, FleetConfig, load_fleet, parse_fleet
from fleetserve.engines.fleet import (
    DEFAULT_READY_TIMEOUT_S,
    LaunchError,
    busy_ports,
    describe_launch,
    engine_ports,
    launch_engines,
)
from fleetserve.engines.kinds import ENGINE_KINDS
from fleetserve.engines.smollm2 import SMOLLM2_ALIAS
from fleetserve.fleet.scrape import parse_metrics
from fleetserve.fleet.state import DIALECTS, EngineMetrics, EngineState
from fleetserve.gateway.app import Gateway
from fleetserve.gateway.server import run_gateway
from fleetserve.model.catalog import UnknownEntry, default_catalog
from fleetserve.routing import POLICIES
from fleetserve.workload.readers import read_trace
from fleetserve.workload.trace import write_jsonl

# The demo trace lasts 90 s at about 6 req/s; 3x replays it in 30 s at about 18 req/s.
DEFAULT_RATE_SCALE = 3.0
# llama.cpp on a CPU core makes a few dozen tokens per second: short prompts, short answers, few requests.
REAL_WORKLOAD = "input=uniform:32:128,output=32"
DEFAULT_REAL_REQUESTS = 8
DEFAULT_REAL_ENGINES = 2
# Prompts are built with one word per trace token, which an engine's tokenizer may split further (the
# emulator's hashing tokenizer makes about 1.3 tokens of a word): a prompt is kept if this many times its
# length still fits the context.
TOKENIZER_SLACK = 1.5
# The gateway probes a starting engine every 0.1 s; this only bounds a fleet that never gets ready.
ROUTABLE_TIMEOUT_S = 60.0
TICK_S = 0.25
SAMPLE_QUESTION = "What is the capital of France? Answer in one sentence."


@click.command()
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="Gateway port.")
@click.option(
    "--engine-base-port",
    type=click.IntRange(1, 65535),
    help="First port of the demo's engines, emulated or --real [default: the fleet file's, or the first"
    " free block].",
)
@click.option(
    "--real", is_flag=True, help="Real llama.cpp engines running SmolLM2-135M instead of emulated ones."
)
@click.option(
    "--exit",
    "--no-wait",
    "exit_after",
    is_flag=True,
    help="Stop after the summary instead of serving until Ctrl-C.",
)
@click.option(
    "--requests",
    "num_requests",
    type=click.IntRange(min=1),
    help=f"Send at most this many requests [default: the whole trace; {DEFAULT_REAL_REQUESTS} with --real].",
)
@click.option(
    "--duration",
    type=click.FloatRange(min=0, min_open=True),
    help="Send only the first this many seconds of the replay.",
)
@click.option(
    "--rate-scale",
    default=DEFAULT_RATE_SCALE,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Replay the trace this many times faster than recorded.",
)
@click.option("--policy", help="Routing policy [default: the fleet file's, least_request].")
@click.option(
    "--time-scale",
    type=click.FloatRange(min=0, min_open=True),
    help="Stretch every emulated duration (2 = half speed) [default: the fleet file's].",
)
@click.option(
    "--engines",
    "real_engines",
    default=DEFAULT_REAL_ENGINES,
    show_default=True,
    type=click.IntRange(min=1),
    help="llama.cpp servers to run with --real.",
)
@click.option(
    "--fleet",
    "fleet_file",
    type=click.Path(exists=True, dir_okay=False),
    help="Run the demo on this fleet file instead of the packaged one.",
)
@click.option(
    "--ready-timeout",
    default=DEFAULT_READY_TIMEOUT_S,
    show_default=True,
    type=click.FloatRange(min=1),
    help="Seconds the engines have to start.",
)
def demo(
    port: int,
    engine_base_port: int | None,
    real: bool,
    exit_after: bool,
    num_requests: int | None,
    duration: float | None,
    rate_scale: float,
    policy: str | None,
    time_scale: float | None,
    real_engines: int,
    fleet_file: str | None,
    ready_timeout: float,
) -> None:
    """Run a heterogeneous fleet behind the gateway, replay a burst of traffic, show what each engine did,
    then keep serving on http://127.0.0.1:PORT until Ctrl-C."""
    if real and fleet_file:
        raise click.UsageError("--real runs its own llama.cpp fleet; drop --fleet")
    if policy is not None and policy not in POLICIES:
        raise click.UsageError(f"unknown policy {policy!r}; valid policies: {', '.join(sorted(POLICIES))}")
    try:
        base = load_fleet(fleet_file) if fleet_file else packaged_fleet()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    config = configure(base if not real else real_fleet(base, real_engines), port=port, time_scale=time_scale)
    if engine_base_port is None:
        config = with_free_engine_ports(config)
    else:
        config = config.with_engine_base_port(engine_base_port)
        if busy := busy_ports(config.emulator.host, engine_ports(config)):
            raise click.ClickException(
                f"engine port(s) {', '.join(map(str, busy))} are in use; pick another --engine-base-port"
            )
    host = config.gateway.host
    if busy_ports(host, [port]):
        raise click.ClickException(
            f"port {port} on {host} is in use (another fleetserve demo or gateway?); "
            f"pick a free one with --port, e.g. fleetserve demo --port {port + 1}"
        )
    console = make_console(highlight=False)
    model = config.engines[0].model
    url = f"http://{host}:{port}"
    # SIGTERM (docker stop, systemd) takes Ctrl-C's path, so the engines are stopped in order and the
    # temporary files removed; by default it would end the process as soon as uvicorn re-raised it.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with tempfile.TemporaryDirectory(prefix="fleetserve-demo-") as tmp:
        workdir = Path(tmp)
        if real:
            bench = BenchConfig(
                url=url,
                model=model,
                workload=REAL_WORKLOAD,
                concurrency=real_engines,
                num_requests=num_requests or DEFAULT_REAL_REQUESTS,
                duration_s=duration,
                endpoint="chat",
                slo=SLO(config.slo.ttft_ms, config.slo.tpot_ms),
            )
            total = bench.num_requests or 0
        else:
            trace = workdir / "trace.jsonl"
            total = write_demo_trace(
                trace, model, rate_scale=rate_scale, duration=duration, limit=num_requests
            )
            bench = BenchConfig(
                url=url,
                model=model,
                trace=trace,
                rate_scale=rate_scale,
                endpoint="chat",
                slo=SLO(config.slo.ttft_ms, config.slo.tpot_ms),
            )
        try:
            result = uvloop.run(
                run_demo(
                    config, bench, total, console, policy=policy, wait=not exit_after, timeout=ready_timeout
                )
            )
        except LaunchError as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            console.print("interrupted")
            raise SystemExit(130) from None
    if result.interrupted:
        raise SystemExit(130)
    if result.summary.failed:
        sys.stdout.flush()
        raise click.ClickException(f"{result.summary.failed} request(s) failed: {result.summary.failures}")


# -- the fleet ---------------------------------------------------------------------------------------


def packaged_fleet() -> FleetConfig:
    text = resources.files("fleetserve").joinpath("data", "demo_fleet.yaml").read_text()
    return parse_fleet(text, source="demo_fleet.yaml")


def real_fleet(base: FleetConfig, replicas: int) -> FleetConfig:
    """The packaged fleet's gateway and router in front of llama.cpp servers of SmolLM2-135M. Their
    server (llama-cpp-python) has no /metrics, so the gateway routes on its own in-flight counts."""
    group = EngineGroup(
        name="smollm2", kind="llamacpp", model=SMOLLM2_ALIAS, replicas=replicas, dialect="none"
    )
    return base.model_copy(update={"engines": [group]})


def configure(config: FleetConfig, *, port: int, time_scale: float | None) -> FleetConfig:
    engines = config.engines
    if time_scale is not None:
        engines = [
            group.model_copy(update={"time_scale": time_scale}) if group.kind == "emulated" else group
            for group in engines
        ]
    gateway = config.gateway.model_copy(update={"port": port})
    return config.model_copy(update={"engines": engines, "gateway": gateway})


def with_free_engine_ports(config: FleetConfig) -> FleetConfig:
    """The fleet file's engine ports when they are free, else the first block of free ones: a user of
    the demo chooses the gateway's port, not the engines'."""
    host, wanted = config.emulator.host, engine_ports(config)
    if not busy_ports(host, wanted) and config.gateway.port not in wanted:
        return config
    sequential = sum(
        1
        for instance in config.instances()
        if ENGINE_KINDS[instance.group.kind].launched and instance.group.port is None
    )
    return config.with_engine_base_port(free_port_block(host, sequential, avoid=config.gateway.port))


def free_port_block(host: str, count: int, avoid: int) -> int:
    for _ in range(100):
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            base = sock.getsockname()[1]
        ports = range(base, base + count)
        if base + count <= 65536 and avoid not in ports and not busy_ports(host, list(ports)):
            return base
    raise click.ClickException(f"found no {count} consecutive free ports on {host} for the engines")


def write_demo_trace(
    path: Path, model: str, *, rate_scale: float, duration: float | None, limit: int | None
) -> int:
    """Writes the requests of the packaged trace the demo will send and returns how many: the first
    `duration` seconds of the sped-up replay, at most `limit` requests, leaving out prompts that may not
    fit the model's context (they would only come back as 400s)."""
    with resources.as_file(resources.files("fleetserve").joinpath("data", "demo_trace.jsonl")) as packaged:
        requests = sorted(read_trace(packaged), key=lambda request: request.timestamp_ms)
    if requests and duration is not None:
        first = requests[0].timestamp_ms
        requests = [r for r in requests if (r.timestamp_ms - first) / 1000.0 / rate_scale < duration]
    context = max_context(model)
    if context is not None:
        requests = [r for r in requests if r.input_length * TOKENIZER_SLACK + r.output_length <= context]
    requests = requests[:limit]
    if not requests:
        raise click.UsageError("no request of the demo trace is left to send; raise --duration or --requests")
    write_jsonl(requests, path)
    return len(requests)


def max_context(model: str) -> int | None:
    try:
        return default_catalog().model(model).max_context
    except UnknownEntry:
        return None


# -- the run -----------------------------------------------------------------------------------------


async def run_demo(
    config: FleetConfig,
    bench: BenchConfig,
    total: int,
    console: Console,
    *,
    policy: str | None,
    wait: bool,
    timeout: float,
) -> BenchResult:
    kinds = Counter(f"{group.gpu or 'cpu'}" for group in config.engines for _ in range(group.replicas))
    mix = ", ".join(f"{count} x {gpu}" for gpu, count in kinds.items())
    count = sum(kinds.values())
    engines = f"{count} engine{'s' if count != 1 else ''}"
    console.print(f"[bold]fleetserve demo[/]: starting {engines} ({mix}) serving {bench.model}")
    async with launch_engines(config, ready_timeout=timeout) as launched:
        for engine in launched.engines:
            console.print("  " + describe_launch(config, engine))
        gateway = Gateway(config, policy=policy)
        async with serving(config, gateway) as running:
            url = running.url
            await wait_routable(gateway, ROUTABLE_TIMEOUT_S)
            policy_name = policy or config.router.policy
            console.print(f"gateway on {url} (policy {policy_name}); all engines ready")
            watch = FleetWatch(gateway)
            what = "requests of the demo trace" if bench.trace else "chat requests"
            console.print(
                f"replaying {total} {what}" + (f" at {bench.rate_scale:g}x speed" if bench.trace else "")
            )
            result = await replay(bench, total, watch, running, console)
            if running.task.done():
                console.print("interrupted")
                return result
            rows = await engine_rows(gateway, watch)
            console.print(engine_table(rows, bench.model))
            console.print(summary_line(result, rows))
            if config.engines[0].kind == "llamacpp":
                console.print(f"a real answer: {await sample_answer(url, bench.model)!r}")
            if wait:
                console.print(examples(url, bench.model))
                await running.stopped()
                console.print("stopping")
    return result


@dataclass(frozen=True)
class RunningGateway:
    url: str
    task: asyncio.Task[None]

    async def stopped(self) -> None:
        """Until the gateway stops serving: Ctrl-C (uvicorn handles it) or SIGTERM. Shielded, so that a
        cancelled demo still stops the gateway in order."""
        await asyncio.shield(self.task)


@contextlib.asynccontextmanager
async def serving(config: FleetConfig, gateway: Gateway) -> AsyncIterator[RunningGateway]:
    """The gateway on this loop, from the moment it listens; stopped on exit."""
    stop, listening = asyncio.Event(), asyncio.Event()
    urls: list[str] = []

    def ready(url: str) -> None:
        urls.append(url)
        listening.set()

    task = asyncio.create_task(run_gateway(config, gateway=gateway, stop=stop, on_ready=ready))
    try:
        waiting = asyncio.create_task(listening.wait())
        await asyncio.wait({task, waiting}, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        if not urls:
            await task  # re-raise why it did not start
            raise LaunchError("the gateway stopped before it listened")
        yield RunningGateway(urls[0], task)
    finally:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)


async def wait_routable(gateway: Gateway, timeout: float) -> None:
    """Until the gateway's own probes find every engine ready, so the replay starts on the whole fleet."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not all(engine.health.routable for engine in gateway.registry.engines()):
        if asyncio.get_running_loop().time() > deadline:
            waiting = [e.engine_id for e in gateway.registry.engines() if not e.health.routable]
            raise LaunchError(f"engines not ready at the gateway after {timeout:g} s: {', '.join(waiting)}")
        await asyncio.sleep(0.05)


# -- live view -----------------------------------------------------------------------------------------


@dataclass
class FleetWatch:
    """What the gateway knows of each engine, sampled while the replay runs (KV usage peaks would be
    missed by a single look at the end)."""

    gateway: Gateway
    peak_kv: dict[str, float] = field(default_factory=dict)

    def sample(self) -> None:
        for engine in self.gateway.registry.engines():
            kv = engine.metrics.kv_usage if engine.metrics else None
            if kv is not None:
                self.peak_kv[engine.engine_id] = max(kv, self.peak_kv.get(engine.engine_id, 0.0))

    def table(self) -> Table:
        table = Table(box=None, pad_edge=False)
        for name in ("engine", "gpu", "in flight", "running", "waiting", "KV"):
            table.add_column(name, justify="left" if name in ("engine", "gpu") else "right")
        for engine in self.gateway.registry.engines():
            metrics = engine.metrics
            table.add_row(
                engine.engine_id,
                engine.spec.gpu or "cpu",
                str(engine.in_flight),
                _or_dash(metrics.running if metrics else None),
                _or_dash(metrics.waiting if metrics else None),
                "-" if metrics is None or metrics.kv_usage is None else f"{metrics.kv_usage:.0%}",
            )
        return table


class ReplayProgress:
    """`run_bench`'s observer: counts on a rich progress bar."""

    def __init__(self, total: int) -> None:
        self.progress = Progress(
            TextColumn("[bold]replay"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("sent {task.fields[sent]}  failed {task.fields[failed]}"),
            TimeElapsedColumn(),
        )
        self._task = self.progress.add_task("replay", total=total, sent=0, failed=0)
        self.sent = self.done = self.failed = 0

    def request_sent(self) -> None:
        self.sent += 1
        self.progress.update(self._task, sent=self.sent)

    def request_done(self, record: RequestRecord) -> None:
        self.done += 1
        self.failed += not record.ok
        self.progress.update(self._task, completed=self.done, failed=self.failed)


async def replay(
    bench: BenchConfig, total: int, watch: FleetWatch, gateway: RunningGateway, console: Console
) -> BenchResult:
    """Runs the benchmark with a live view. If the gateway stops meanwhile (uvicorn handles Ctrl-C and
    SIGTERM), sending stops too, and the result is marked interrupted."""
    progress = ReplayProgress(total)
    stop = asyncio.Event()
    running = asyncio.ensure_future(run_bench(bench, progress, stop=stop))

    def view() -> RenderableType:
        return Group(progress.progress, watch.table())

    live = Live(get_renderable=view, console=console, refresh_per_second=4, transient=True)
    with live if console.is_terminal else contextlib.nullcontext():
        while not running.done():
            await asyncio.wait({running}, timeout=TICK_S)
            watch.sample()
            if gateway.task.done():
                stop.set()
    return running.result()


# -- the report ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineRow:
    engine_id: str
    gpu: str
    requests: int
    errors: int
    output_tokens: float | None
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    peak_kv: float | None
    prefix_hit_rate: float | None


async def engine_rows(gateway: Gateway, watch: FleetWatch) -> list[EngineRow]:
    watch.sample()
    answered = gateway_requests_by_engine(gateway)
    engines = gateway.registry.engines()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        scraped = await asyncio.gather(*(scrape_engine(session, engine) for engine in engines))
    rows = []
    for engine, metrics in zip(engines, scraped, strict=True):
        ok, errors = answered.get(engine.engine_id, (0, 0))
        reported = metrics or EngineMetrics()
        queries, hits = reported.prefix_cache_queries, reported.prefix_cache_hits
        buckets = list(reported.ttft_buckets)
        rows.append(
            EngineRow(
                engine_id=engine.engine_id,
                gpu=engine.spec.gpu or "cpu",
                requests=ok,
                errors=errors,
                output_tokens=reported.generation_tokens,
                ttft_p50_s=histogram_quantile(0.5, buckets),
                ttft_p99_s=histogram_quantile(0.99, buckets),
                peak_kv=watch.peak_kv.get(engine.engine_id),
                prefix_hit_rate=hits / queries if queries and hits is not None else None,
            )
        )
    return rows


def gateway_requests_by_engine(gateway: Gateway) -> dict[str, tuple[int, int]]:
    """(answered 200, answered otherwise) per engine, from the gateway's own request counter."""
    out: dict[str, tuple[int, int]] = {}
    for family in gateway.metrics.requests.collect():
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue
            engine = sample.labels.get("engine", "")
            ok, errors = out.get(engine, (0, 0))
            if sample.labels.get("status") == "200":
                ok += int(sample.value)
            else:
                errors += int(sample.value)
            out[engine] = (ok, errors)
    return out


async def scrape_engine(session: aiohttp.ClientSession, engine: EngineState) -> EngineMetrics | None:
    """What the engine's /metrics says, read with its dialect's names (fleet/scrape.py); None for an
    engine that exposes none (llama-cpp-python) or does not answer."""
    dialect = DIALECTS.get(engine.spec.dialect)
    if dialect is None:
        return None
    try:
        async with session.get(engine.url + "/metrics") as response:
            if response.status != 200:
                return None
            text = await response.text()
    except (aiohttp.ClientError, TimeoutError):
        return None
    return parse_metrics(text, dialect)


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' `histogram_quantile`: the q-quantile of a cumulative histogram [(le, count), ...],
    interpolated linearly inside the bucket that holds it (so it is only as fine as the buckets)."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower  # the +Inf bucket has no upper bound to interpolate towards
            if count == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower


def engine_table(rows: list[EngineRow], model: str) -> Table:
    """One row per engine; a figure no engine reported (llama-cpp-python has no /metrics) gets no column."""
    columns: dict[str, list[str]] = {
        "engine": [row.engine_id for row in rows],
        "gpu": [row.gpu for row in rows],
        "requests": [str(row.requests) + (f" ({row.errors} err)" if row.errors else "") for row in rows],
        "out tokens": ["-" if r.output_tokens is None else f"{r.output_tokens:,.0f}" for r in rows],
        "TTFT p50": [_ms(row.ttft_p50_s) for row in rows],
        "TTFT p99": [_ms(row.ttft_p99_s) for row in rows],
        "KV peak": ["-" if row.peak_kv is None else f"{row.peak_kv:.0%}" for row in rows],
        "prefix hit": ["-" if r.prefix_hit_rate is None else f"{r.prefix_hit_rate:.0%}" for r in rows],
    }
    shown = {name: cells for name, cells in columns.items() if any(cell != "-" for cell in cells)}
    table = Table(title=f"per engine ({model})", title_justify="left")
    for name in shown:
        table.add_column(name, justify="left" if name in ("engine", "gpu") else "right")
    for cells in zip(*shown.values(), strict=True):
        table.add_row(*cells)
    return table


def summary_line(result: BenchResult, rows: list[EngineRow]) -> str:
    s = result.summary
    line = (
        f"{s.completed}/{s.sent} requests in {s.duration_s:.1f} s ({s.request_throughput:.1f} req/s, "
        f"{s.output_token_throughput:,.0f} output tok/s); at the client TTFT p50 {_ms_of(s.ttft_ms.median)}, "
        f"p99 {_ms_of(s.ttft_ms.p99)}, TPOT p50 {_ms_of(s.tpot_ms.median)}"
    )
    if s.goodput is not None and s.slo is not None:
        slo = f"TTFT {s.slo['ttft_ms']:g} ms / TPOT {s.slo['tpot_ms']:g} ms"
        line += f"; goodput {s.goodput:.1f} req/s within {slo}"
    if s.failed:
        line += f"; [red]{s.failed} failed {s.failures}[/]"
    by_gpu = Counter[str]()
    for row in rows:
        by_gpu[row.gpu] += row.requests
    answered = sum(by_gpu.values())
    if answered and len(by_gpu) > 1:
        shares = ", ".join(f"{gpu} {count / answered:.0%}" for gpu, count in by_gpu.items())
        line += f"\nrequests by GPU type: {shares}"
    return line


async def sample_answer(url: str, model: str) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": SAMPLE_QUESTION}], "max_tokens": 32}
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
            session.post(url + "/v1/chat/completions", json=body) as response,
        ):
            answer = await response.json()
        return answer["choices"][0]["message"]["content"].strip()
    except (aiohttp.ClientError, TimeoutError, KeyError, IndexError, TypeError, ValueError) as exc:
        return f"(no answer: {exc!r})"


def examples(url: str, model: str) -> str:
    return f"""
[bold]The fleet keeps serving on {url}[/] (metrics: {url}/metrics). Try:

  curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}], "max_tokens": 32}}'

  from openai import OpenAI
  client = OpenAI(base_url="{url}/v1", api_key="unused")
  reply = client.chat.completions.create(
      model="{model}", messages=[{{"role": "user", "content": "Hello!"}}], max_tokens=32)
  print(reply.choices[0].message.content)

Ctrl-C to stop."""


def _or_dash(value: int | None) -> str:
    return "-" if value is None else str(value)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:,.0f} ms"


def _ms_of(milliseconds: float | None) -> str:
    return "-" if milliseconds is None else f"{milliseconds:,.0f} ms"
