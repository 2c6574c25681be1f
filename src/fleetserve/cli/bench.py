"""`fleetserve bench`: load-test a live OpenAI-compatible endpoint; `fleetserve bench compare`: put
reports side by side."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from fleetserve.bench.client import RequestRecord
from fleetserve.bench.compare import Report, comparison_table, load_reports, plot_reports
from fleetserve.bench.metrics import SLO
from fleetserve.bench.runner import BenchConfig, BenchResult, run_bench, run_sync
from fleetserve.cli.console import make_console
from fleetserve.errors import InputError


class RichProgress:
    """Counts sent / done / failed on a rich bar; the bar tracks requests when their number is fixed,
    else elapsed time against the duration."""

    def __init__(self, progress: Progress, config: BenchConfig) -> None:
        self._progress = progress
        self._by_count = config.num_requests is not None
        total = config.num_requests if self._by_count else config.duration_s
        self._task = progress.add_task("bench", total=total, sent=0, done=0, failed=0)
        self._start = time.perf_counter()
        self._duration = config.duration_s
        self.sent = self.done = self.failed = 0

    def request_sent(self) -> None:
        self.sent += 1
        self._update()

    def request_done(self, record: RequestRecord) -> None:
        self.done += 1
        self.failed += not record.ok
        self._update()

    def tick(self) -> None:
        self._update()

    def _update(self) -> None:
        if self._by_count:
            completed = float(self.done)
        else:
            completed = min(time.perf_counter() - self._start, self._duration or 0.0)
        self._progress.update(
            self._task, completed=completed, sent=self.sent, done=self.done, failed=self.failed
        )


async def _run_until_interrupted(config: BenchConfig, console: Console, show: bool) -> BenchResult:
    """The first Ctrl-C stops sending and waits for requests in flight, so the report still covers every
    request sent; a second one aborts."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def first_interrupt() -> None:
        console.print("[yellow]stopping: waiting for requests in flight (Ctrl-C again to abort)")
        stop.set()
        loop.remove_signal_handler(signal.SIGINT)

    with contextlib.suppress(NotImplementedError, RuntimeError):  # no signal handlers on this platform
        loop.add_signal_handler(signal.SIGINT, first_interrupt)
    try:
        return await _run_with_progress(config, console, show, stop)
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGINT)


async def _run_with_progress(
    config: BenchConfig, console: Console, show: bool, stop: asyncio.Event
) -> BenchResult:
    if not show:
        return await run_bench(config, stop=stop)
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("sent {task.fields[sent]}  done {task.fields[done]}  failed {task.fields[failed]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        observer = RichProgress(progress, config)
        bench = asyncio.ensure_future(run_bench(config, observer, stop=stop))
        while not bench.done():
            await asyncio.wait({bench}, timeout=0.25)
            observer.tick()
        return bench.result()


@click.group(invoke_without_command=True)
@click.option("--url", help="Base URL of the endpoint, e.g. http://127.0.0.1:8000 (with or without /v1).")
@click.option("--model", help="Model name to request (a trace's adapter names override it per request).")
@click.option("--trace", type=click.Path(exists=True, dir_okay=False), help="Trace file to replay.")
@click.option("--workload", help='Synthetic requests, e.g. "input=512,output=128" (see docs/bench.md).')
@click.option("--rate", type=float, help="Open loop: mean requests/s (Poisson, or Gamma with --burstiness).")
@click.option("--burstiness", type=float, default=1.0, show_default=True, help="Gamma shape; 1 = Poisson.")
@click.option("--concurrency", type=click.IntRange(min=1), help="Closed loop: requests kept in flight.")
@click.option("--rate-scale", type=float, default=1.0, show_default=True, help="Speed up a trace's clock.")
@click.option("--duration", type=float, help="Stop sending after this many seconds.")
@click.option("--num-requests", type=click.IntRange(min=1), help="Stop after sending this many requests.")
@click.option(
    "--endpoint", type=click.Choice(["completions", "chat"]), default="completions", show_default=True
)
@click.option("--slo-ttft-ms", type=float, help="TTFT SLO for goodput.")
@click.option("--slo-tpot-ms", type=float, help="TPOT SLO for goodput.")
@click.option("--timeout", type=float, default=600.0, show_default=True, help="Per-request timeout (s).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--api-key", envvar="FLEETSERVE_API_KEY", help="Bearer token (env FLEETSERVE_API_KEY).")
@click.option("--label", help="Name of this run in reports (default: the JSON file's name).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the report here.")
@click.option("--quiet", is_flag=True, help="No progress bar and no summary table.")
@click.pass_context
def bench(
    ctx: click.Context,
    url: str | None,
    model: str | None,
    trace: str | None,
    workload: str | None,
    rate: float | None,
    burstiness: float,
    concurrency: int | None,
    rate_scale: float,
    duration: float | None,
    num_requests: int | None,
    endpoint: str,
    slo_ttft_ms: float | None,
    slo_tpot_ms: float | None,
    timeout: float,
    seed: int,
    api_key: str | None,
    label: str | None,
    json_path: str | None,
    quiet: bool,
) -> None:
    """Send streaming requests to a live endpoint and measure TTFT, TPOT, ITL, E2E, throughput and
    goodput. Requests come from --trace or --workload; arrivals follow the trace's timestamps, --rate
    (open loop) or --concurrency (closed loop)."""
    if ctx.invoked_subcommand is not None:
        return
    if url is None or model is None:
        raise click.UsageError("--url and --model are required (or use `fleetserve bench compare`)")
    config = BenchConfig(
        url=url,
        model=model,
        trace=trace,
        workload=workload,
        rate=rate,
        burstiness=burstiness,
        concurrency=concurrency,
        rate_scale=rate_scale,
        duration_s=duration,
        num_requests=num_requests,
        endpoint="chat" if endpoint == "chat" else "completions",
        slo=SLO(slo_ttft_ms, slo_tpot_ms),
        timeout_s=timeout,
        seed=seed,
        api_key=api_key,
        label=label or (Path(json_path).stem if json_path else None),
    )
    try:
        config.validate()
    except InputError as error:
        raise click.UsageError(str(error)) from None
    console = make_console(stderr=True)
    result = run_sync(_run_until_interrupted(config, console, show=not quiet and console.is_terminal))
    if json_path:
        result.write_json(json_path)
    if not quiet:
        make_console().print(comparison_table([Report(config.label or "run", result.to_json_dict())]))
        if result.interrupted:
            console.print("[yellow]interrupted: the figures cover the requests sent before the stop")
    if result.summary.sent and not result.summary.completed:
        raise click.ClickException(f"no request completed; failures: {result.summary.failures}")


@bench.command()
@click.argument("reports", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--plot", type=click.Path(dir_okay=False), help="Write CDF and throughput plots (PNG/SVG/PDF).")
def compare(reports: tuple[str, ...], plot: str | None) -> None:
    """Print benchmark reports side by side and optionally plot them."""
    try:
        loaded = load_reports(reports)
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    make_console().print(comparison_table(loaded, title="fleetserve bench compare"))
    if plot:
        plot_reports(loaded, plot)
        click.echo(f"plots written to {plot}")
