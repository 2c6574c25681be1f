"""Twin check: the same trace through the live gateway (emulated engines) and through the simulator.

For each policy: start `fleetserve serve -c FLEET` with `router.policy: P` (it launches the fleet's
emulated engines itself, so every policy starts from cold prefix caches), replay the trace through it
with the load generator (`fleetserve.bench.run_bench`, streaming completions with `ignore_eos`, so output
lengths are the trace's), stop it, and simulate the same trace on the same fleet file with the same
policy. Passes when, for every policy, the TTFT and TPOT medians agree within `--tolerance` and the
policies rank the same by SLO attainment. Appends a table to docs/benchmarks.md; exits 1 when the
agreement fails.

    python benchmarks/twin_check.py                           # 4 policies, ~3 min each
    python benchmarks/twin_check.py --policies round_robin --requests 30 --no-write

Keeping the two sides comparable:

* Time. Every engine runs `--time-scale` S times slower than the engine model predicts, so this 2-core
  machine keeps up; the load generator stretches the trace's arrivals by the same S (`rate_scale` 1/S),
  and live latencies are divided by S to get back to model time. The gateway's scrape interval is wall
  time, so the simulator syncs every `scrape_interval_s / S` model seconds: both see equally stale metrics.
* Prompts. The load generator writes one word per trace token and the emulated engine's hashing
  tokenizer makes one token of each, but piece boundaries and chat templates can still add a few. The
  simulator is therefore fed the token ids the engines actually see (the bench's prompt text, tokenized
  as the engine does), one token per `hash_ids` entry with `hash_block_size` 1: equal lengths and
  exactly the same prefix sharing.
* Ranking. Policies whose simulated SLO attainments are within `--rank-margin` of each other are a tie
  and may come in either order live; every other pair must be ordered the same.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from common import answers, cpu_model, free_port_block, record, stop_process_group
from fleetserve.bench.metrics import SLO
from fleetserve.bench.runner import BenchConfig, BenchResult, run_bench
from fleetserve.config import FleetConfig, parse_fleet
from fleetserve.model.catalog import default_catalog
from fleetserve.protocol.tokenizer import HashTokenizer
from fleetserve.sim import SimOptions, simulate
from fleetserve.workload import TraceRequest
from fleetserve.workload.prompts import prompt_text
from fleetserve.workload.trace import write_jsonl

ROOT = Path(__file__).resolve().parents[1]
FLEETSERVE = Path(sys.executable).with_name("fleetserve")
MODEL = "llama-3-8b"
# Two fast engines and one slow one: round robin's third of traffic on the L4 keeps every policy's
# medians inside one engine type's mode (with 2 + 2 a round-robin median would straddle the two modes).
FLEET = (("h100", "h100-80g", 2), ("l4", "l4", 1))
DEFAULT_POLICIES = ("round_robin", "least_request", "power_of_two", "prefix_aware")
SCRAPE_INTERVAL_S = 0.2
SHARED_PREFIXES = 6  # distinct 512-token "system prompts" that requests share
BLOCK = 512
BENCH_SEED = 0


@dataclass(frozen=True)
class TwinSettings:
    requests: int = 100
    rate: float = 3.0  # model-time requests per second
    time_scale: float = 4.0
    slo_ttft_ms: float = 1000.0
    slo_tpot_ms: float = 40.0
    seed: int = 0
    output_tokens: tuple[int, int] = (32, 192)  # uniform, inclusive
    fleet: tuple[tuple[str, str, int], ...] = FLEET  # (group name, gpu, replicas)
    # the fleet file's `migration:` block, for both sides (interval_s in wall seconds, as the gateway
    # runs it; the simulator gets it in model time)
    migration: tuple[tuple[str, Any], ...] = ()
    router_params: tuple[tuple[str, Any], ...] = ()  # the fleet file's `router.params`, for both sides


@dataclass(frozen=True)
class Figures:
    """One side's TTFT and TPOT (model-time ms), SLO attainment over all requests, and completions."""

    ttft_ms: float
    tpot_ms: float
    ttft_mean_ms: float
    slo_attainment: float
    completed: int
    requests: int
    ttft_by_request_ms: np.ndarray  # in trace order; NaN where the request failed


@dataclass(frozen=True)
class PolicyRun:
    policy: str
    live: Figures
    sim: Figures
    send_lag_p99_ms: float  # wall time: how late the load generator sent against its schedule
    engine_ttft_mean_ms: float  # model time, as the engines timed it (from arrival at the engine)
    live_shares: dict[str, int]  # requests per engine, as the gateway counted them
    sim_shares: dict[str, int]
    live_migrations: dict[str, int]  # moves carried out, by reason
    sim_migrations: dict[str, int]

    def errors(self) -> tuple[float, float]:
        return _relative(self.live.ttft_ms, self.sim.ttft_ms), _relative(self.live.tpot_ms, self.sim.tpot_ms)

    def ttft_deltas_ms(self) -> tuple[float, float, float]:
        """p10, p50, p90 over requests of live minus simulated TTFT (model ms): with the same routing,
        the live system's own overhead per request."""
        delta = self.live.ttft_by_request_ms - self.sim.ttft_by_request_ms
        delta = delta[~np.isnan(delta)]
        if not len(delta):
            return (float("nan"),) * 3
        p10, p50, p90 = np.percentile(delta, [10, 50, 90])
        return float(p10), float(p50), float(p90)


def make_trace(settings: TwinSettings) -> list[TraceRequest]:
    """Poisson arrivals; 70% of prompts start with one of a few shared 512-token blocks, then a unique
    part; output lengths uniform in `settings.output_tokens`."""
    rng = np.random.default_rng(settings.seed)
    gaps = rng.exponential(1.0 / settings.rate, settings.requests)
    times_ms = np.round(np.cumsum(gaps) * 1000.0 - gaps[0] * 1000.0, 3)
    shortest, longest = settings.output_tokens
    trace = []
    for timestamp in times_ms:
        shared = rng.random() < 0.7
        unique = int(rng.integers(256, 1536))
        trace.append(
            TraceRequest(
                timestamp_ms=float(timestamp),
                input_length=unique + (BLOCK if shared else 0),
                output_length=int(rng.integers(shortest, longest + 1)),
                hash_ids=(int(rng.integers(SHARED_PREFIXES)),) if shared else None,
                hash_block_size=BLOCK,
            )
        )
    return trace


def engine_view(trace: Sequence[TraceRequest], vocab_size: int, seed: int = BENCH_SEED) -> list[TraceRequest]:
    """The trace as the emulated engines receive it from the load generator: each prompt is the bench's
    text tokenized by the engine's tokenizer, carried as one `hash_ids` entry per token so the simulator
    shares exactly the prefixes the engines share."""
    tokenizer = HashTokenizer(vocab_size)
    out = []
    for index, request in enumerate(trace):
        token_ids = tuple(tokenizer.encode(prompt_text(request, index=index, seed=seed)))
        out.append(
            TraceRequest(
                timestamp_ms=request.timestamp_ms,
                input_length=len(token_ids),
                output_length=request.output_length,
                hash_ids=token_ids,
                hash_block_size=1,
            )
        )
    return out


def fleet_document(settings: TwinSettings, policy: str, gateway_port: int, base_port: int) -> dict:
    return {
        "engines": [
            {
                "name": name,
                "model": MODEL,
                "gpu": gpu,
                "replicas": replicas,
                "time_scale": settings.time_scale,
            }
            for name, gpu, replicas in settings.fleet
        ],
        "router": {"policy": policy, "params": dict(settings.router_params)},
        "slo": {"ttft_ms": settings.slo_ttft_ms, "tpot_ms": settings.slo_tpot_ms},
        "gateway": {"port": gateway_port, "scrape_interval_s": SCRAPE_INTERVAL_S, "max_queue": 4096},
        "emulator": {"base_port": base_port},
        **({"migration": dict(settings.migration)} if settings.migration else {}),
    }


# live side


def _metric_by_label(url: str, name: str, label: str, only: str = "") -> dict[str, float]:
    """Sum of a Prometheus metric's samples (those whose labels include `only`), per value of one label."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        labels, _, value = line.rpartition(" ")
        key = f'{label}="'
        if key not in labels or only not in labels:
            continue
        label_value = labels.split(key, 1)[1].split('"', 1)[0]
        totals[label_value] = totals.get(label_value, 0.0) + float(value)
    return totals


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            raise RuntimeError(f"{what}: the server exited with code {process.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready within {timeout:.0f} s")
        time.sleep(0.1)


def run_live(
    fleet_file: Path, config: FleetConfig, trace_file: Path, settings: TwinSettings, log: Path
) -> tuple[BenchResult, dict[str, int], float, dict[str, int]]:
    """One bench run through a fresh `fleetserve serve -c` (gateway plus launched engines): the result,
    requests per engine, the engines' own mean TTFT (wall seconds, from their vLLM histograms) and the
    moves the migration controller carried out, by reason."""
    argv = [str(FLEETSERVE), "serve", "-c", str(fleet_file)]
    with log.open("wb") as out:
        server = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://{config.gateway.host}:{config.gateway.port}"
    engines = len(config.instances())
    try:
        _wait_for(
            lambda: (
                answers(url + "/ready")
                and sum(_metric_by_label(url, "fleetserve_engine_routable", "engine").values()) == engines
            ),
            120,
            "gateway and engines",
            server,
        )
        bench = BenchConfig(
            url=url,
            model=MODEL,
            trace=trace_file,
            rate_scale=1.0 / settings.time_scale,
            endpoint="completions",
            slo=SLO(settings.slo_ttft_ms * settings.time_scale, settings.slo_tpot_ms * settings.time_scale),
            timeout_s=600.0,
            seed=BENCH_SEED,
        )
        result = asyncio.run(run_bench(bench))
        shares = _metric_by_label(url, "fleetserve_gateway_requests_total", "engine")
        moved = _metric_by_label(url, "fleetserve_migrations_total", "reason", only='outcome="moved"')
        ttft_sum = ttft_count = 0.0
        for instance in config.instances():
            ttft_sum += sum(
                _metric_by_label(instance.url, "vllm:time_to_first_token_seconds_sum", "model_name").values()
            )
            ttft_count += sum(
                _metric_by_label(
                    instance.url, "vllm:time_to_first_token_seconds_count", "model_name"
                ).values()
            )
    finally:
        stop_process_group(server, timeout=15)
    engine_ttft = ttft_sum / ttft_count if ttft_count else float("nan")
    shares = {engine: int(count) for engine, count in sorted(shares.items()) if engine}
    return result, shares, engine_ttft, {reason: int(count) for reason, count in moved.items()}


def live_figures(result: BenchResult, settings: TwinSettings) -> Figures:
    scale = settings.time_scale
    done = [record for record in result.records if record.ok and record.ttft is not None]
    ttft = np.array([record.ttft for record in done]) / scale
    tpot = np.array([record.tpot or 0.0 for record in done]) / scale
    met = (ttft * 1000.0 <= settings.slo_ttft_ms) & (tpot * 1000.0 <= settings.slo_tpot_ms)
    by_request = np.full(len(result.records), np.nan)
    for request in done:
        by_request[request.index] = 1000.0 * request.ttft / scale
    return Figures(
        ttft_ms=float(np.median(ttft)) * 1000.0 if done else float("nan"),
        tpot_ms=float(np.median(tpot)) * 1000.0 if done else float("nan"),
        ttft_mean_ms=float(np.mean(ttft)) * 1000.0 if done else float("nan"),
        slo_attainment=float(met.sum()) / len(result.records) if result.records else 0.0,
        completed=len(done),
        requests=len(result.records),
        ttft_by_request_ms=by_request,
    )


# simulated side


def run_sim(
    config: FleetConfig, trace: Sequence[TraceRequest], policy: str, settings: TwinSettings
) -> tuple[Figures, dict[str, int], dict[str, int]]:
    options = SimOptions(sync_interval_s=config.gateway.scrape_interval_s / settings.time_scale)
    # the live loop's interval is wall time; the engines' model time runs time_scale x slower
    migration = config.migration.model_copy(
        update={"interval_s": config.migration.interval_s / settings.time_scale}
    )
    config = config.model_copy(update={"migration": migration})
    result = simulate(config, trace, policy, seed=settings.seed, options=options)
    arrays = result.requests
    ttft, tpot = arrays.ttft(), arrays.tpot()
    figures = Figures(
        ttft_ms=float(np.median(ttft)) * 1000.0 if len(ttft) else float("nan"),
        tpot_ms=float(np.median(tpot)) * 1000.0 if len(tpot) else float("nan"),
        ttft_mean_ms=float(np.mean(ttft)) * 1000.0 if len(ttft) else float("nan"),
        slo_attainment=float(result["slo_attainment"]),
        completed=int(result["completed"]),
        requests=int(result["requests"]),
        ttft_by_request_ms=1000.0 * (arrays.first_token - arrays.arrival),
    )
    shares = {engine: int(row["requests"]) for engine, row in result["per_engine"].items()}
    moved = result.summary.get("migrations", {}).get("by_reason", {})
    return figures, shares, moved


# comparison


def _relative(live: float, sim: float) -> float:
    return abs(live - sim) / sim if sim > 0 else float("inf")


def rank_disagreements(runs: Sequence[PolicyRun], margin: float) -> list[str]:
    """Pairs of policies the simulator orders (by SLO attainment, beyond `margin`) and live traffic orders
    the other way round."""
    wrong = []
    for i, a in enumerate(runs):
        for b in runs[i + 1 :]:
            sim_gap = a.sim.slo_attainment - b.sim.slo_attainment
            live_gap = a.live.slo_attainment - b.live.slo_attainment
            if abs(sim_gap) > margin and sim_gap * live_gap <= 0:
                wrong.append(f"{a.policy} vs {b.policy}")
    return wrong


def check_twin(
    policies: Sequence[str],
    settings: TwinSettings,
    work: Path,
    progress: Callable[[str], None] = print,
) -> list[PolicyRun]:
    """Run every policy live and simulated; the caller judges the figures."""
    trace = make_trace(settings)
    trace_file = work / "trace.jsonl"
    write_jsonl(trace, trace_file)
    vocab_size = default_catalog().model(MODEL).vocab_size
    seen_by_engines = engine_view(trace, vocab_size)
    runs = []
    for policy in policies:
        started = time.monotonic()
        engines = sum(replicas for _, _, replicas in settings.fleet)
        # one block of free ports: the engines', then the gateway's
        base_port = free_port_block(engines + 1)
        document = fleet_document(settings, policy, base_port + engines, base_port)
        fleet_file = work / f"fleet-{policy}.yaml"
        fleet_file.write_text(yaml.safe_dump(document, sort_keys=False))
        config = parse_fleet(fleet_file.read_text(), str(fleet_file))
        log = work / f"serve-{policy}.log"
        result, live_shares, engine_ttft, live_moves = run_live(fleet_file, config, trace_file, settings, log)
        sim, sim_shares, sim_moves = run_sim(config, seen_by_engines, policy, settings)
        run = PolicyRun(
            policy,
            live_figures(result, settings),
            sim,
            result.summary.send_lag_ms.p99 or 0.0,
            1000.0 * engine_ttft / settings.time_scale,
            live_shares,
            sim_shares,
            live_moves,
            sim_moves,
        )
        runs.append(run)
        progress(
            f"{policy}: TTFT p50 live {run.live.ttft_ms:.1f} sim {run.sim.ttft_ms:.1f} ms, TPOT p50 live "
            f"{run.live.tpot_ms:.2f} sim {run.sim.tpot_ms:.2f} ms ({time.monotonic() - started:.0f} s)"
        )
    return runs


def report(
    runs: Sequence[PolicyRun], settings: TwinSettings, tolerance: float, margin: float, command: str
) -> tuple[str, bool]:
    rows = []
    ok = True
    for run in runs:
        ttft_error, tpot_error = run.errors()
        agrees = (
            ttft_error <= tolerance and tpot_error <= tolerance and run.live.completed == run.live.requests
        )
        ok &= agrees
        shares = " / ".join(
            f"{run.live_shares.get(engine, 0)}:{count}" for engine, count in sorted(run.sim_shares.items())
        )
        low, middle, high = run.ttft_deltas_ms()
        rows.append(
            f"| {run.policy} | {run.live.completed}/{run.live.requests} "
            f"| {run.live.ttft_ms:.1f} | {run.sim.ttft_ms:.1f} | {100 * ttft_error:.1f}% "
            f"| {run.live.tpot_ms:.2f} | {run.sim.tpot_ms:.2f} | {100 * tpot_error:.1f}% "
            f"| {100 * run.live.slo_attainment:.1f}% | {100 * run.sim.slo_attainment:.1f}% "
            f"| {run.live.ttft_mean_ms:.1f} / {run.engine_ttft_mean_ms:.1f} / {run.sim.ttft_mean_ms:.1f} "
            f"| {middle:.2f} [{low:.2f}, {high:.2f}] "
            f"| {shares} | {run.send_lag_p99_ms:.1f} | {'yes' if agrees else 'NO'} |"
        )
    wrong = rank_disagreements(runs, margin)
    ok &= not wrong
    live_order = " > ".join(r.policy for r in sorted(runs, key=lambda r: -r.live.slo_attainment))
    sim_order = " > ".join(r.policy for r in sorted(runs, key=lambda r: -r.sim.slo_attainment))
    fleet = " + ".join(f"{n} x {gpu}" for _, gpu, n in settings.fleet)
    section = "\n".join(
        [
            "## Twin check: live gateway + emulated engines vs the simulator",
            "",
            f"- date: {datetime.datetime.now(datetime.UTC):%a %b %d %H:%M:%S UTC %Y}",
            f"- machine: {os.cpu_count()} cores (nproc), {cpu_model()}, Python {platform.python_version()}, "
            "shared with other jobs",
            f"- command: `{command}`",
            f"- fleet: {fleet} emulated engines serving {MODEL} via `fleetserve serve -c` "
            "(fresh per policy), "
            f"time_scale {settings.time_scale:g}; the simulator on the same fleet file, sync interval "
            f"{SCRAPE_INTERVAL_S:g} s / {settings.time_scale:g}",
            f"- trace: {settings.requests} requests, Poisson {settings.rate:g} req/s (model time, stretched "
            f"{settings.time_scale:g}x live), 70% share one of {SHARED_PREFIXES} 512-token prefixes, "
            f"unique part 256-1535 tokens, output {settings.output_tokens[0]}-{settings.output_tokens[1]} "
            "tokens (ignore_eos), seed "
            f"{settings.seed}; the simulator gets the engines' token ids (see docs/simulator.md)",
            f"- SLO: TTFT <= {settings.slo_ttft_ms:g} ms, TPOT <= {settings.slo_tpot_ms:g} ms (model time); "
            "latencies are medians in model-time ms (live wall times / time_scale); shares = "
            "requests per engine live:sim; lag = load generator's send lag p99, wall ms; TTFT mean as the "
            "client saw it, as the engines timed it (from arrival at the engine, by the engine model on the "
            "wall clock) and simulated: client - engine is gateway + HTTP + delivery overhead; TTFT live - "
            "sim per request: p50 [p10, p90] of each request's difference (the same requests on the same "
            "engines only under round_robin)",
            "",
            "| policy | done | TTFT live | TTFT sim | err | TPOT live | TPOT sim | err "
            "| SLO live | SLO sim | TTFT mean client / engine / sim | TTFT live - sim per request "
            "| shares | lag | agree |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            f"- ranking by SLO attainment: live {live_order}; sim {sim_order} "
            f"(pairs within {100 * margin:g} points in the simulator are ties)"
            + (f"; ORDER DIFFERS: {', '.join(wrong)}" if wrong else "; same order"),
            f"- verdict: {'PASS' if ok else 'FAIL'} (medians within {100 * tolerance:g}%, same ranking)",
            "",
        ]
    )
    return section, ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    defaults = TwinSettings()
    parser.add_argument("--policies", default=",".join(DEFAULT_POLICIES))
    parser.add_argument("--requests", type=int, default=defaults.requests)
    parser.add_argument("--rate", type=float, default=defaults.rate, help="model-time requests/s")
    parser.add_argument("--time-scale", type=float, default=defaults.time_scale)
    parser.add_argument("--slo-ttft-ms", type=float, default=defaults.slo_ttft_ms)
    parser.add_argument("--slo-tpot-ms", type=float, default=defaults.slo_tpot_ms)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--tolerance", type=float, default=0.10, help="relative error allowed on medians")
    parser.add_argument("--rank-margin", type=float, default=0.05, help="SLO-attainment gap that is a tie")
    parser.add_argument("--keep", type=Path, help="keep the trace, fleet files and server logs here")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md")
    args = parser.parse_args()
    settings = TwinSettings(
        requests=args.requests,
        rate=args.rate,
        time_scale=args.time_scale,
        slo_ttft_ms=args.slo_ttft_ms,
        slo_tpot_ms=args.slo_tpot_ms,
        seed=args.seed,
    )
    policies = [policy.strip() for policy in args.policies.split(",") if policy.strip()]
    with tempfile.TemporaryDirectory(prefix="twin_check_") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        runs = check_twin(policies, settings, work)
    command = "python benchmarks/twin_check.py " + " ".join(sys.argv[1:])
    section, ok = report(runs, settings, args.tolerance, args.rank_margin, command.strip())
    print(section)
    if not args.no_write:
        record(section)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
