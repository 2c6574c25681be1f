"""`fleetserve plan`: the cheapest GPU mix for a trace, verified in the simulator, written as a fleet
file that `sim` and `serve` accept."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click
import yaml

from fleetserve.cli.console import make_console
from fleetserve.cli.sim import (
    _json_option,
    _load,
    _split,
    _user_errors,
    _write_json,
    profile_store,
    profiles_option,
)
from fleetserve.config import FleetConfig


@click.command("plan")
@click.option("-c", "--config", "config_path", type=click.Path(exists=True, dir_okay=False), required=True,
              help="Fleet file: the model, SLO, engine args and the allowed GPU types (its engine groups;"
              " their replica counts are ignored).")  # fmt: skip
@click.option("--trace", "trace_path", type=click.Path(exists=True, dir_okay=False), required=True,
              help="The workload to plan for (any trace format `sim` reads).")  # fmt: skip
@click.option("--format", "trace_format", default="auto", show_default=True, help="Trace format.")
@click.option("--limit", type=click.IntRange(min=1), help="Plan for the first N requests only.")
@click.option("--gpus", help="Comma-separated GPU types to choose from (default: the fleet file's groups).")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True),
              help="Rescale the trace to this mean arrival rate (req/s).")  # fmt: skip
@click.option("--target", type=click.FloatRange(0, 1, min_open=True), default=0.9, show_default=True,
              help="SLO attainment the fleet must reach in the simulator.")  # fmt: skip
@click.option(
    "--slice-factor",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Slices per length bucket: how finely one bucket may be split across GPU types.",
)
@click.option(
    "--max-rounds",
    type=click.IntRange(min=0),
    default=8,
    show_default=True,
    help="Replays that may add capacity when the plan misses the target.",
)
@click.option(
    "--baselines/--no-baselines",
    default=True,
    show_default=True,
    help="Also size each GPU type alone (the homogeneous fleets the savings are against).",
)
@profiles_option
@click.option("--no-profile-cache", is_flag=True, help="Measure every profile and keep none.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for policies that draw.")
@click.option("-o", "--output", "output_path", type=click.Path(dir_okay=False), required=True,
              help="Write the planned fleet file here.")  # fmt: skip
@_json_option("Print the plan as one JSON line (or write it to PATH).")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines on stderr.")
def plan(
    config_path: str,
    trace_path: str,
    trace_format: str,
    limit: int | None,
    gpus: str | None,
    rate: float | None,
    target: float,
    slice_factor: int,
    max_rounds: int,
    baselines: bool,
    profile_dir: str | None,
    no_profile_cache: bool,
    seed: int,
    output_path: str,
    json_path: str | None,
    quiet: bool,
) -> None:
    """Plan the cheapest mix of GPU types that meets the SLO target on a trace.

    Each GPU type is profiled per (input, output) length bucket in the simulator: the highest rate one
    replica sustains within the SLO (cached on disk). An integer program (Mélange's, solved by HiGHS)
    picks the replica counts and which bucket goes to which type. The planned fleet, routed by the
    `planned` policy, replays the trace; capacity is added where it falls short. Each GPU type alone is
    sized the same way for comparison.
    """
    from fleetserve.sim.planner import PlanOptions, plan_fleet

    def step(text: str) -> None:
        if not quiet:
            click.echo(text, err=True)

    with _user_errors():
        config, trace = _load(config_path, trace_path, trace_format, limit)
        store = profile_store(profile_dir, cache=not no_profile_cache)
        result = plan_fleet(
            config, trace, gpus=_split(gpus) or None, rate_rps=rate,
            options=PlanOptions(target=target, slice_factor=slice_factor, max_rounds=max_rounds, seed=seed,
                                baselines=baselines),
            store=store, clock=time.perf_counter, on_step=step,
        )  # fmt: skip
    _write_fleet_file(config_path, result.config, output_path)
    payload = result.to_json() | {"fleet_file": output_path}
    if json_path is not None:
        _write_json(payload, json_path)
    if json_path != "-":
        _print_plan(payload)
        click.echo(f"wrote the planned fleet file to {output_path}", err=True)


def _write_fleet_file(source: str, planned: FleetConfig, output_path: str) -> None:
    """The source fleet file with its `engines:` and `router:` replaced, everything else as written."""
    document = yaml.safe_load(Path(source).read_text()) or {}
    document["engines"] = [
        group.model_dump(mode="json", exclude_defaults=True) | {"name": group.name, "model": group.model}
        for group in planned.engines
    ]
    document["router"] = planned.router.model_dump(mode="json", exclude_defaults=True) | {"policy": "planned"}
    header = (
        f"# Planned by `fleetserve plan` from {Path(source).name}: the cheapest GPU mix that met the SLO\n"
        "# target in the simulator, routed by the plan's bucket table (router.params.routes).\n"
    )
    Path(output_path).write_text(header + yaml.safe_dump(document, sort_keys=False))


def _print_plan(payload: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"GPU mix for SLO attainment >= {payload['target']:.0%}")
    for column in ("fleet", "replicas", "$/hour", "SLO attainment"):
        table.add_column(column, justify="left" if column in ("fleet", "replicas") else "right")
    replicas = ", ".join(f"{n} x {name}" for name, n in payload["replicas"].items())
    table.add_row("plan", replicas, f"{payload['usd_per_hour']:.2f}", f"{payload['slo_attainment']:.1%}")
    for name, baseline in payload["baselines"].items():
        if baseline.get("meets_target"):
            table.add_row(
                f"{name} alone", f"{baseline['replicas']} x {name}", f"{baseline['usd_per_hour']:.2f}",
                f"{baseline['slo_attainment']:.1%}",
            )  # fmt: skip
        else:
            table.add_row(f"{name} alone", baseline.get("why", "cannot meet the target"), "-", "-")
    console = make_console()
    console.print(table)
    savings = payload["savings_vs_best_homogeneous"]
    if savings is not None:
        console.print(f"savings against the cheapest homogeneous fleet: {savings:.1%}")
    console.print(f"solver: {payload['solve_s']:.2f} s; profiles measured {payload['profiles']['measured']},"
                  f" cached {payload['profiles']['cached']}")  # fmt: skip
    for note in payload["notes"]:
        console.print(f"note: {note}")
