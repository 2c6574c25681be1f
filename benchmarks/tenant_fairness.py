"""Fairness when one tenant floods: VTC against FIFO, live (gateway + emulated engines) and in the twin.

Three tenants share a fleet. Their fair share is a third of the fleet's capacity at the SLO behind the
stage (found first by the simulator's capacity search). For each load of B and C (a fraction of their
share, `--loads`), three conditions, each through a fresh `fleetserve serve -c` with launched emulated
engines and then the simulator on the same fleet file and trace:

* `alone`: tenants B and C send their load, A is silent (the `vtc` stage on);
* `vtc`:   A sends 10 x its share on top (the `vtc` stage: Virtual Token Counter);
* `fifo`:  the same, with the `priority` stage instead (one priority: first come, first served), which
           holds requests at the same saturation point, so only the order of release differs.

Reported per condition and side: B's and C's p99 TTFT (model-time ms), how many of their requests were
refused, and A's completions. The target: with VTC, B's and C's p99 TTFT within 1.5x of `alone`.

    python benchmarks/tenant_fairness.py                 # ~25 min
    python benchmarks/tenant_fairness.py --duration 20 --loads 0.5 --no-write
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml

from common import free_port_block, publish, section_head
from fleetserve.config import FleetConfig, parse_fleet
from fleetserve.model.catalog import default_catalog
from fleetserve.sim import SimOptions, simulate
from fleetserve.sim.capacity import find_capacity
from fleetserve.workload import TraceRequest
from fleetserve.workload.generators import UniformLengths, WorkloadSpec, generate
from fleetserve.workload.trace import write_jsonl
from twin_check import MODEL, TwinSettings, engine_view, fleet_document, run_live

TENANTS = ("tenant-a", "tenant-b", "tenant-c")
LIGHT = ("tenant-b", "tenant-c")
FLOOD = 10.0  # A sends this many times its fair share
SLOTS_PER_ENGINE = 6
MAX_QUEUE_S = 20.0


@dataclasses.dataclass(frozen=True)
class Side:
    """One condition on one side: per tenant p99 TTFT (model ms), completed and refused requests."""

    p99_ttft_ms: dict[str, float]
    completed: dict[str, int]
    refused: dict[str, int]


def workload(rate_per_share: float, a_share: float, duration_s: float, seed: int) -> list[TraceRequest]:
    shares = (a_share, 1.0, 1.0) if a_share > 0 else (1.0, 1.0)
    names = TENANTS if a_share > 0 else LIGHT
    spec = WorkloadSpec(
        rate=rate_per_share * sum(shares),
        duration_s=duration_s,
        tenants=len(shares),
        tenant_shares=shares,
        input_lengths=UniformLengths(200, 800),
        output_lengths=UniformLengths(64, 192),
        seed=seed,
    )
    rename = {f"tenant-{i}": name for i, name in enumerate(names)}
    return [dataclasses.replace(r, tenant=rename[r.tenant or ""]) for r in generate(spec)]


def document(
    settings: TwinSettings, stage: str, gateway_port: int, base_port: int, time_scale: float = 1.0
) -> dict:
    """The fleet file; `time_scale` stretches the waits (the live gateway's are wall seconds, and its
    engines run `settings.time_scale` times slower than the engine model; the twin's are model time)."""
    fleet = fleet_document(settings, "least_request", gateway_port, base_port)
    wait = MAX_QUEUE_S * time_scale
    fleet["pipeline"] = [{"stage": stage, "params": {"slots_per_engine": SLOTS_PER_ENGINE}}]
    if stage == "priority":
        fleet["pipeline"][0]["params"]["max_wait_s"] = wait
    fleet["tenants"] = [{"name": name, "limits": {"max_queue_s": wait}} for name in TENANTS]
    return fleet


def fair_share_rate(settings: TwinSettings, seed: int) -> float:
    """A third of the fleet's capacity (requests per second, model time): the highest rate of this mix
    at which the fleet behind the stage still meets the SLO for 90% of requests, found by the
    simulator's capacity search. The stage keeps each engine at its slots, so this is close to the
    fleet's saturated throughput: a tenant at 1 x its share is a critically loaded queue of its own."""
    config = parse_fleet(yaml.safe_dump(document(settings, "vtc", 1, 2)))
    trace = workload(1.0, 1.0, 60.0, seed)
    return find_capacity(config, trace, "least_request", target=0.9, seed=seed).capacity_rps / 3.0


def live_side(trace: Sequence[TraceRequest], records: Sequence, scale: float) -> Side:
    ttft: dict[str, list[float]] = {name: [] for name in TENANTS}
    completed = dict.fromkeys(TENANTS, 0)
    refused = dict.fromkeys(TENANTS, 0)
    for rec in records:
        tenant = trace[rec.index].tenant or ""
        if rec.ok and rec.ttft is not None:
            ttft[tenant].append(1000.0 * rec.ttft / scale)
            completed[tenant] += 1
        elif rec.status in (429, 503):
            refused[tenant] += 1
    return Side(_p99(ttft), completed, refused)


def sim_side(config: FleetConfig, trace: Sequence[TraceRequest], settings: TwinSettings) -> Side:
    options = SimOptions(sync_interval_s=config.gateway.scrape_interval_s / settings.time_scale)
    summary = simulate(config, trace, "least_request", seed=settings.seed, options=options).summary
    per = summary["per_tenant"]
    return Side(
        {name: per[name]["ttft_ms"]["p99"] or math.nan for name in per},
        {name: per[name]["completed"] for name in per},
        {name: per[name]["requests"] - per[name]["completed"] for name in per},
    )


def _p99(values: dict[str, list[float]]) -> dict[str, float]:
    return {k: float(np.percentile(v, 99)) if v else math.nan for k, v in values.items() if v}


Condition = tuple[float, str]  # (B's and C's load as a fraction of their share, condition name)


def run(
    settings: TwinSettings, duration_s: float, fractions: Sequence[float], work: Path
) -> tuple[float, dict[Condition, tuple[Side, Side]]]:
    share = fair_share_rate(settings, settings.seed)
    print(f"fair share: {share:.2f} req/s per tenant (model time)", flush=True)
    vocab = default_catalog().model(MODEL).vocab_size
    out: dict[Condition, tuple[Side, Side]] = {}
    for fraction in fractions:
        rate = share * fraction  # B's and C's rate; A's stays 10 x the share
        for condition, stage, a_share in (
            ("alone", "vtc", 0.0),
            ("vtc", "vtc", FLOOD / fraction),
            ("fifo", "priority", FLOOD / fraction),
        ):
            started = time.monotonic()
            trace = workload(rate, a_share, duration_s, settings.seed)
            name = f"{condition}-{fraction:g}"
            trace_file = work / f"trace-{name}.jsonl"
            write_jsonl(trace, trace_file)
            engines = sum(replicas for _, _, replicas in settings.fleet)
            base_port = free_port_block(engines + 1)
            fleet_file = work / f"fleet-{name}.yaml"
            ports = (base_port + engines, base_port)
            fleet_file.write_text(yaml.safe_dump(document(settings, stage, *ports, settings.time_scale)))
            config = parse_fleet(fleet_file.read_text(), str(fleet_file))
            result, _, _ = run_live(fleet_file, config, trace_file, settings, work / f"serve-{name}.log")
            config = parse_fleet(yaml.safe_dump(document(settings, stage, *ports)))  # the twin's waits
            live = live_side(trace, result.records, settings.time_scale)
            seen = [
                dataclasses.replace(view, tenant=original.tenant)
                for view, original in zip(engine_view(trace, vocab), trace, strict=True)
            ]
            twin = sim_side(config, seen, settings)
            out[(fraction, condition)] = (live, twin)
            print(
                f"{name}: B/C p99 TTFT live {_light(live):.0f} ms, twin {_light(twin):.0f} ms"
                f" ({time.monotonic() - started:.0f} s)",
                flush=True,
            )
    return share, out


def _light(side: Side) -> float:
    """The worse of B's and C's p99 TTFT."""
    return max(side.p99_ttft_ms.get(tenant, math.nan) for tenant in LIGHT)


def report(
    share: float, out: dict[Condition, tuple[Side, Side]], settings: TwinSettings, duration_s: float
) -> str:
    rows = []
    summary = []
    for (fraction, condition), (live, twin) in out.items():
        cells = []
        for index, side in enumerate((live, twin)):
            alone = _light(out[(fraction, "alone")][index])
            cells.append(
                f"{side.p99_ttft_ms.get('tenant-b', math.nan):.0f} / "
                f"{side.p99_ttft_ms.get('tenant-c', math.nan):.0f} | {_light(side) / alone:.2f}x | "
                f"{sum(side.refused.get(t, 0) for t in LIGHT)} | {side.completed.get('tenant-a', 0)}"
            )
        rows.append(f"| {fraction:g} | {condition} | {cells[0]} | {cells[1]} |")
        if condition == "fifo":
            alone = _light(out[(fraction, "alone")][0])
            with_vtc = _light(out[(fraction, "vtc")][0]) / alone
            summary.append(
                f"B and C at {fraction:g} x their share: live p99 TTFT {with_vtc:.2f}x their `alone` "
                f"figure under VTC, {_light(live) / alone:.2f}x under FIFO."
            )
    fleet = " + ".join(f"{n} x {gpu}" for _, gpu, n in settings.fleet)
    return "\n".join(
        [
            *section_head(
                "Tenant fairness: one tenant floods, VTC against FIFO, live and in the twin",
                "tenant_fairness.py",
            ),
            f"- fleet: {fleet} emulated engines ({MODEL}, time_scale {settings.time_scale:g}) via "
            "`fleetserve serve -c`, least_request routing; stage `vtc` or `priority` (FIFO at one "
            f"priority) with slots_per_engine {SLOTS_PER_ENGINE}, max wait {MAX_QUEUE_S:g} s (model "
            "time); then `sim` on the same file and trace",
            f"- trace: {duration_s:g} s (model time) per run; fair share {share:.2f} req/s per tenant (a "
            "third of the fleet's capacity at the SLO behind the stage, by the simulator's capacity "
            f"search); A sends {FLOOD:g}x its share (or nothing: `alone`), B and C each send the given "
            "fraction of theirs; Poisson arrivals, prompts 200-800, outputs 64-192 tokens",
            "- columns per side: B / C p99 TTFT (model ms); the worse of the two over `alone`'s at the same "
            "load; B's and C's requests refused (429/503); A's requests completed",
            "",
            "| B, C load | condition | live B / C p99 | live vs alone | live B+C refused | live A done "
            "| twin B / C p99 | twin vs alone | twin B+C refused | twin A done |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            *rows,
            "",
            *summary,
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=60.0, help="Model-time seconds of each trace.")
    parser.add_argument("--time-scale", type=float, default=3.0, help="Emulated engines' slow-down.")
    parser.add_argument(
        "--loads", default="0.5,1", help="B's and C's rates as fractions of their share, comma-separated."
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help="Do not append to docs/benchmarks.md.")
    args = parser.parse_args()
    settings = TwinSettings(
        time_scale=args.time_scale, seed=args.seed, fleet=(("h100", "h100-80g", 1), ("l4", "l4", 1))
    )
    with tempfile.TemporaryDirectory() as work:
        fractions = [float(value) for value in args.loads.split(",")]
        share, out = run(settings, args.duration, fractions, Path(work))
    section = report(share, out, settings, args.duration)
    publish(section, not args.no_write)


if __name__ == "__main__":
    main()
