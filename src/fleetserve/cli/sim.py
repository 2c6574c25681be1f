"""`fleetserve sim`: replay a trace against a simulated fleet, find its capacity, or sweep policies,
fleet shapes and rates."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import orjson
import yaml

from fleetserve.autoscale.mix import GpuOption, LengthBuckets
from fleetserve.cli.console import make_console
from fleetserve.config import FleetConfig, load_fleet
from fleetserve.control import FleetStep, parse_fleet_script
from fleetserve.errors import InputError
from fleetserve.routing import make_policy
from fleetserve.sim import SimOptions, find_capacity, plan_cells, run_sweep, simulate
from fleetserve.sim.capacity import Probe
from fleetserve.sim.metrics import FAILURE_REASONS
from fleetserve.sim.planner import bucket_demand
from fleetserve.sim.profiles import ProfileStore, default_profile_dir, planned_options
from fleetserve.workload import TraceRequest, TransformSpec, apply_transforms, read_trace


def _config_option(required: bool = True) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(
        "-c", "--config", "config_path", type=click.Path(exists=True, dir_okay=False), required=required,
        help="Fleet file (the same one the gateway reads).",
    )  # fmt: skip


def _trace_options(function: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--trace", "trace_path", type=click.Path(exists=True, dir_okay=False),
                     help="Trace file (fleetserve/Mooncake JSONL, Azure, BurstGPT, ... CSV)."),
        click.option("--format", "trace_format", default="auto", show_default=True, help="Trace format."),
        click.option("--limit", type=click.IntRange(min=1), help="Replay only the first N requests."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed for policies that draw."),
        click.option("--sync-interval", type=click.FloatRange(min=0), default=None,
                     help="Seconds between fleet syncs (scraped metrics, hooks); default: the fleet "
                     "file's gateway.scrape_interval_s; 0 syncs before every arrival."),
        click.option("-q", "--quiet", is_flag=True, help="No progress display."),
    ]  # fmt: skip
    for option in reversed(options):
        function = option(function)
    return function


def _json_option(help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(
        "--json", "json_path", is_flag=False, flag_value="-", default=None, metavar="[PATH]", help=help_text
    )


@contextmanager
def _user_errors() -> Iterator[None]:
    """Bad input becomes a one-line error and exit status 1, not a traceback."""
    try:
        yield
    except InputError as exc:  # a fleet file, trace or parameters that cannot be simulated
        raise click.ClickException(str(exc)) from None


def _check_policy(name: str | None, config: FleetConfig) -> None:
    """Fail before simulating when the policy or its parameters are unknown."""
    name = name or config.router.policy
    params = dict(config.router.params) if name == config.router.policy else {}
    try:
        make_policy(name, params)
    except InputError as exc:
        raise click.ClickException(str(exc)) from None


def _load(
    config_path: str, trace_path: str | None, fmt: str, limit: int | None, rate_scale: float = 1.0
) -> tuple[FleetConfig, list[TraceRequest]]:
    if trace_path is None:
        raise click.UsageError("--trace is required")
    config = load_fleet(config_path)
    spec = TransformSpec(rate_scale=rate_scale, limit=limit)
    try:
        trace = apply_transforms(read_trace(trace_path, fmt), spec)
    except InputError as exc:  # an unknown format name, or a transform the trace does not allow
        raise click.ClickException(str(exc)) from None
    if not trace:
        raise click.ClickException(f"{trace_path}: the trace has no requests")
    return config, trace


def _fleet_script(path: str) -> list[FleetStep]:
    try:
        entries = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise click.ClickException(f"{path}: cannot read the fleet script: {exc}") from None
    if not isinstance(entries, list):
        raise click.ClickException(f"{path}: a fleet script is a YAML list of steps")
    return parse_fleet_script(entries, source=path)


def profiles_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--profiles", "profile_dir", type=click.Path(file_okay=False),
        help="Directory of cached GPU profiles [default: $XDG_CACHE_HOME/fleetserve/profiles].",
    )(function)  # fmt: skip


def profile_store(profile_dir: str | None, cache: bool = True) -> ProfileStore:
    return ProfileStore(None if not cache else Path(profile_dir) if profile_dir else default_profile_dir())


def _planned(
    config: FleetConfig, trace: list[TraceRequest], profile_dir: str | None, quiet: bool
) -> dict[str, GpuOption]:
    """The planned groups' profiles over the length buckets of the trace."""
    store = profile_store(profile_dir)
    seen = bucket_demand(trace, LengthBuckets())
    options = planned_options(config, seen, store, workers=os.cpu_count() or 1)
    if not quiet:
        click.echo(
            f"planned groups: {store.measured} profile(s) measured, {store.hits} from the cache", err=True
        )
    return options


def _options(sync_interval: float | None) -> SimOptions:
    return SimOptions(sync_interval_s=sync_interval)


@contextmanager
def _progress(enabled: bool, description: str) -> Iterator[Callable[[int, int], None] | None]:
    """A rich progress bar on stderr, only for a person watching a terminal."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress(
        "[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=Console(stderr=True), transient=True,
    ) as progress:  # fmt: skip
        task = progress.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield update


def _write_json(payload: Any, path: str) -> None:
    data = orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
    if path == "-":
        sys.stdout.write(data.decode() + "\n")
        sys.stdout.flush()
    else:
        Path(path).write_bytes(data + b"\n")


def _print_summary(summary: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"policy {summary['policy']} on {summary['fleet']['engines']} engines")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("requests", f"{summary['requests']} ({summary['failed']} failed)")
    for reason, count in summary["failures"].items():
        table.add_row(f"  failed: {reason}", f"{count}: {FAILURE_REASONS.get(reason, reason)}")
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        stats = summary[key]
        if stats["p50"] is not None:
            table.add_row(key, f"p50 {stats['p50']:.1f}  p90 {stats['p90']:.1f}  p99 {stats['p99']:.1f}")
    table.add_row("SLO attainment", f"{summary['slo_attainment']:.1%}")
    offered = summary["offered_rps"]
    table.add_row("offered rate", "n/a" if offered is None else f"{offered:.2f} req/s (over the arrivals)")
    table.add_row("achieved rate", f"{summary['achieved_rps']:.2f} req/s (over the run, drain included)")
    table.add_row("goodput", f"{summary['goodput_rps']:.2f} req/s (met the SLO, over the run)")
    table.add_row("throughput", f"{summary['throughput_tok_s']:.0f} output tok/s")
    table.add_row("prefix hit rate", f"{summary['prefix_hit_rate']:.1%}")
    table.add_row("preemptions", str(summary["preemptions"]))
    table.add_row("cost", f"${summary['cost_usd']:.2f} over {summary['duration_s']:.1f} s simulated")
    if "scale_events" in summary:
        table.add_row(
            "autoscaling",
            f"{len(summary['scale_events'])} scale events, {summary['cold_starts']} cold starts,"
            f" {summary['never_ready']} never ready; {summary['gpu_hours']:.2f} GPU-hours",
        )
        for model, plan in summary.get("plans", {}).items():
            counts = ", ".join(f"{count} x {name}" for name, count in plan["replicas"].items())
            table.add_row(f"  last plan, {model}", f"{counts} (${plan['usd_per_hour']:.2f}/h)")
    table.add_row("speed", f"{summary['sim_requests_per_s']:.0f} requests/s in {summary['wall_s']:.2f} s")
    console = make_console()
    console.print(table)
    if "per_tenant" in summary:
        console.print(_tenant_table(summary["per_tenant"], summary["jain_fairness"]))


def _tenant_table(per_tenant: dict[str, Any], jain: float) -> Any:
    from rich.table import Table

    table = Table(title=f"per tenant (Jain's fairness index over service / weight: {jain:.3f})")
    for column in ("tenant", "requests", "completed", "429", "output tok/s", "TTFT p50 ms", "TTFT p99 ms"):
        table.add_column(column, justify="left" if column == "tenant" else "right")
    for name, row in per_tenant.items():
        ttft = row["ttft_ms"]
        table.add_row(
            name,
            str(row["requests"]),
            str(row["completed"]),
            str(row["rejected_429"]),
            f"{row['throughput_tok_s']:.0f}",
            "-" if ttft["p50"] is None else f"{ttft['p50']:.1f}",
            "-" if ttft["p99"] is None else f"{ttft['p99']:.1f}",
        )
    return table


@click.group("sim", invoke_without_command=True)
@_config_option(required=False)
@_trace_options
@click.option("--policy", help="Routing policy (default: the fleet file's router.policy).")
@click.option("--rate-scale", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="Multiply the trace's arrival rate.")  # fmt: skip
@_json_option("Write the summary as JSON to PATH (bare --json: one line on stdout).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write an HTML report.")
@click.option("--fleet-script", "script_path", type=click.Path(exists=True, dir_okay=False),
              help="YAML list of fleet changes during the run, e.g. `- {at_s: 60, start: h100}`, "
              "`- {at_s: 300, drain: l4-0, timeout_s: 60}`, `- {at_s: 400, stop: l4-1}` (seconds after "
              "the first arrival; a started engine serves after its cold start).")  # fmt: skip
@click.option("--migration", type=click.Choice(["none", "drain_time", "freeness"]),
              help="Move running requests between engines (default: the fleet file's migration.policy):"
              " drain_time (heterogeneity-aware) or freeness (Llumnix's metric).")  # fmt: skip
@profiles_option
@click.pass_context
def sim(
    ctx: click.Context,
    config_path: str | None,
    trace_path: str | None,
    trace_format: str,
    limit: int | None,
    seed: int,
    sync_interval: float | None,
    quiet: bool,
    policy: str | None,
    rate_scale: float,
    json_path: str | None,
    report_path: str | None,
    script_path: str | None,
    migration: str | None,
    profile_dir: str | None,
) -> None:
    """Replay a trace against the simulated fleet a fleet file describes.

    Groups autoscaled by `planned` are sized from GPU profiles the simulator measures per length bucket
    of the trace (cached on disk, see --profiles)."""
    if ctx.invoked_subcommand is not None:
        return
    if config_path is None:
        raise click.UsageError("-c/--config is required")
    with _user_errors():
        config, trace = _load(config_path, trace_path, trace_format, limit, rate_scale)
        _check_policy(policy, config)
        if migration is not None:
            settings = config.migration.model_copy(update={"policy": migration})
            config = config.model_copy(update={"migration": settings})
        options = _options(sync_interval)
        if script_path is not None:
            options = dataclasses.replace(options, fleet_script=_fleet_script(script_path))
        if config.planned_groups():
            options = dataclasses.replace(
                options, planned_options=_planned(config, trace, profile_dir, quiet)
            )
        with _progress(not quiet, "simulating") as progress:
            result = simulate(config, trace, policy, seed, options=options, progress=progress)
    summary = result.summary
    if json_path is not None:
        _write_json(summary, json_path)
    if report_path is not None:
        from fleetserve.sim.report import render_report

        render_report([summary], report_path, title=f"fleetserve sim: {Path(config_path).name}")
        click.echo(f"wrote the HTML report to {report_path}", err=True)
    if json_path != "-":
        _print_summary(summary)


@sim.command("capacity")
@_config_option()
@_trace_options
@click.option("--policy", help="Routing policy (default: the fleet file's router.policy).")
@click.option("--target", type=click.FloatRange(0, 1, min_open=True), default=0.9, show_default=True,
              help="SLO attainment the fleet must keep.")  # fmt: skip
@click.option("--tolerance", type=click.FloatRange(min=0, min_open=True), default=0.02, show_default=True,
              help="Stop when the bracket is this close (relative).")  # fmt: skip
@click.option("--max-probes", type=click.IntRange(min=1), default=20, show_default=True)
@_json_option("Print the result as one JSON line (or write it to PATH).")
def capacity(
    config_path: str,
    trace_path: str | None,
    trace_format: str,
    limit: int | None,
    seed: int,
    sync_interval: float | None,
    quiet: bool,
    policy: str | None,
    target: float,
    tolerance: float,
    max_probes: int,
    json_path: str | None,
) -> None:
    """The highest arrival rate at which SLO attainment stays >= target."""

    def show(probe: Probe) -> None:
        if not quiet:
            attained = (
                f"below the target {target:.0%} (stopped early, once it was out of reach)"
                if probe.stopped_early
                else f"{probe.slo_attainment:.1%}"
            )
            click.echo(f"probe {probe.rate_rps:.3f} req/s: SLO attainment {attained}", err=True)

    with _user_errors():
        config, trace = _load(config_path, trace_path, trace_format, limit)
        _check_policy(policy, config)
        result = find_capacity(
            config, trace, policy, target=target, seed=seed, options=_options(sync_interval),
            tolerance=tolerance, max_probes=max_probes, on_probe=show,
        )  # fmt: skip
    if json_path is not None:
        _write_json(result.to_json(), json_path)
    if json_path != "-":
        bound = "" if result.bounded else " (at least; no probed rate missed the target)"
        click.echo(
            f"capacity {result.capacity_rps:.3f} req/s{bound} with SLO attainment "
            f"{result.slo_attainment:.1%} (target {target:.0%})"
        )


def _split(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


@sim.command("sweep")
@_config_option()
@_trace_options
@click.option("--policies", help="Comma-separated policies (default: the fleet file's router.policy).")
@click.option("--rates", help="Comma-separated arrival rates in requests/s (default: the trace's own).")
@click.option("--fleets", help="Comma-separated extra fleet files to sweep alongside -c.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Local worker processes.")  # fmt: skip
@click.option(
    "--ray",
    "ray_address",
    metavar="ADDRESS",
    help="Run the cells as Ray tasks on this cluster ('auto', 'ray://host:10001', 'local').",
)
@_json_option("Write all cells' summaries as JSON to PATH (bare --json: stdout).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write an HTML report.")
def sweep(
    config_path: str,
    trace_path: str | None,
    trace_format: str,
    limit: int | None,
    seed: int,
    sync_interval: float | None,
    quiet: bool,
    policies: str | None,
    rates: str | None,
    fleets: str | None,
    workers: int,
    ray_address: str | None,
    json_path: str | None,
    report_path: str | None,
) -> None:
    """Simulate every combination of policies, fleet shapes and arrival rates, in parallel."""
    with _user_errors():
        config, trace = _load(config_path, trace_path, trace_format, limit)
        shapes = [(Path(config_path).stem, config)]
        shapes += [(Path(path).stem, load_fleet(path)) for path in _split(fleets) if path != config_path]
        policy_names = _split(policies) or [config.router.policy]
        for name in policy_names:
            _check_policy(name, config)
        rate_values: list[float | None] = [float(rate) for rate in _split(rates)] or [None]
        if any(rate is not None and rate <= 0 for rate in rate_values):
            raise click.BadParameter("rates must be > 0", param_hint="--rates")
        cells = plan_cells(shapes, policy_names, rate_values, seed, _options(sync_interval))
        with _progress(not quiet, f"{len(cells)} simulations") as progress:
            results = run_sweep(cells, trace, workers=workers, ray_address=ray_address, on_done=progress)
    if json_path is not None:
        _write_json({"cells": results}, json_path)
    if report_path is not None:
        from fleetserve.sim.report import render_report

        render_report(results, report_path, title=f"fleetserve sim sweep: {len(results)} runs")
        click.echo(f"wrote the HTML report to {report_path}", err=True)
    if json_path != "-":
        click.echo(f"{'fleet':>16} {'policy':>16} {'offered':>14}  {'SLO':>10}  {'TTFT p99':>18}  cost")
        for result in results:
            click.echo(
                f"{result['fleet_name']:>16} {result['policy']:>16} {result['rate_rps']:8.3f} req/s  "
                f"SLO {result['slo_attainment']:6.1%}  TTFT p99 {result['ttft_ms']['p99'] or 0:9.1f} ms  "
                f"${result['cost_usd']:.2f}"
            )
