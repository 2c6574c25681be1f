"""Every routing policy, live, on the Mooncake conversation trace and an emulated heterogeneous fleet.

For each policy in turn: start a fresh fleet of emulated engines (cold prefix caches; all engines in one
process, `fleetserve engine emulate --fleet`), a gateway in front of it (`fleetserve serve --no-launch
--policy P`), replay the same slice of the trace through it with the load generator
(`fleetserve.bench.run_bench`, streaming completions; the trace's hash_ids become shared prompt text), and
read the engines' prefix-cache counters before and after. Appends a table to docs/benchmarks.md.

    python benchmarks/routing_live.py                       # every policy, ~1 min each
    python benchmarks/routing_live.py --policies round_robin,prefix_aware --requests 100

Scaling to a 2-core machine: `--rate-scale` speeds the trace's arrivals up, `--time-scale` stretches every
engine duration (so a scale of 2 with a rate scale of 2 is the real load, twice as slow), and the engines
stream 8 tokens per chunk to keep the event count (CPU) down; TPOT is unaffected (it comes from usage).

Trace: kvcache-ai/Mooncake FAST25-release conversation trace (Apache-2.0).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

from common import answers, cpu_model, free_port, record, shared_trace, stop_process_group
from fleetserve.bench.metrics import SLO
from fleetserve.bench.runner import BenchConfig, BenchResult, run_bench
from fleetserve.routing import POLICIES
from fleetserve.workload.readers import read_trace
from fleetserve.workload.trace import TraceRequest, write_jsonl
from fleetserve.workload.transform import scale_lengths

ROOT = Path(__file__).resolve().parents[1]
TRACE = shared_trace("mooncake_conversation.jsonl")
FLEETSERVE = Path(sys.executable).with_name("fleetserve")
# Mistral-7B: Llama-3-8B's shape (32 layers, 8 KV heads) with the 32k context the trace needs
MODEL = "mistral-7b"
FLEET = (("h100", "h100-80g", 4), ("a100", "a100-80g", 4), ("l4", "l4", 8))
# the cache-aware policies first, so a short run still shows the headline comparison
ORDER = ("round_robin", "prefix_aware", "kv_cost", "dualmap", "scored", "slo_aware", "session")


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready within {timeout:.0f} s")
        time.sleep(0.2)


def metric_sum(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line.split("{")[0].split(" ")[0] == name:
            total += float(line.rpartition(" ")[2])
    return total


def prefix_counters(urls: list[str]) -> tuple[float, float]:
    hits = sum(metric_sum(url, "vllm:prefix_cache_hits_total") for url in urls)
    queries = sum(metric_sum(url, "vllm:prefix_cache_queries_total") for url in urls)
    return hits, queries


def spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)


def run_policy(
    policy: str, args: argparse.Namespace, trace: Path, work: Path, kv_events: bool = False
) -> tuple[BenchResult, float]:
    """One run on a fresh fleet; returns the bench result and the fleet's prefix-cache hit rate. With
    `kv_events` the engines publish KV events and the gateway's policies read the precise index they
    feed instead of learning their own."""
    groups, urls = [], []
    for name, gpu, replicas in FLEET:
        for index in range(replicas):
            port = free_port()
            urls.append(f"http://127.0.0.1:{port}")
            group = {"name": f"{name}-{index}", "model": MODEL, "gpu": gpu, "port": port}
            groups.append({**group, "kv_events": True} if kv_events else group)
    engines_file = work / f"engines-{policy}.yaml"
    engines_file.write_text(
        yaml.safe_dump({"engines": [{**g, "time_scale": args.time_scale} for g in groups]})
    )
    gateway_port = free_port()
    gateway_file = work / f"gateway-{policy}.yaml"
    external = [
        {"name": g["name"], "model": MODEL, "gpu": g["gpu"], "url": url, "kv_events": kv_events}
        for g, url in zip(groups, urls, strict=True)
    ]
    gateway_file.write_text(
        yaml.safe_dump(
            {
                "engines": external,
                "router": {"policy": policy},
                "slo": {"ttft_ms": args.ttft_slo_ms, "tpot_ms": args.tpot_slo_ms},
                "gateway": {"scrape_interval_s": 0.25, "health_interval_s": 1.0, "max_queue": 4096},
            }
        )
    )
    engines = spawn(
        [
            *(str(FLEETSERVE), "engine", "emulate", "--fleet", str(engines_file)),
            *("--stream-interval", "8"),
        ],
        work / f"engines-{policy}.log",
    )
    gateway = None
    try:
        wait_for(lambda: all(answers(url + "/v1/models") for url in urls), 120, "engines")
        gateway = spawn(
            [str(FLEETSERVE), "serve", "-c", str(gateway_file), "--no-launch", "--port", str(gateway_port)],
            work / f"gateway-{policy}.log",
        )
        gateway_url = f"http://127.0.0.1:{gateway_port}"
        wait_for(
            lambda: (
                answers(gateway_url + "/ready")
                and metric_sum(gateway_url, "fleetserve_engine_routable") == len(urls)
            ),
            120,
            "gateway",
        )
        before = prefix_counters(urls)
        config = BenchConfig(
            url=gateway_url,
            model=MODEL,
            trace=trace,
            rate_scale=args.rate_scale,
            endpoint="completions",
            slo=SLO(ttft_ms=args.ttft_slo_ms, tpot_ms=args.tpot_slo_ms),
            timeout_s=300.0,
            label=policy,
        )
        result = asyncio.run(run_bench(config))
        after = prefix_counters(urls)
    finally:
        if gateway is not None:
            stop_process_group(gateway)
        stop_process_group(engines)
    queries = after[1] - before[1]
    return result, (after[0] - before[0]) / queries if queries else 0.0


def conversation_key(request: TraceRequest) -> int:
    """Every request of the trace starts with block 0 (a shared system prompt); its second block is the
    conversation's own first block, so later turns of one conversation share it."""
    hash_ids = request.hash_ids or ()
    return hash_ids[1] if len(hash_ids) > 1 else 0


def trace_slice(source: Path, window_s: float, every: int, length_scale: float, work: Path) -> Path:
    """The conversations of the trace's first `window_s` seconds whose key is a multiple of `every`
    (whole conversations, so a thinned trace keeps its turns), prompts scaled by `length_scale` (hash
    blocks scale with them, so the prefix sharing is unchanged), outputs as recorded."""
    original = [
        request
        for request in read_trace(source)
        if request.timestamp_ms < window_s * 1000 and conversation_key(request) % every == 0
    ]
    scaled = scale_lengths(original, length_scale)
    path = work / "trace.jsonl"
    write_jsonl(
        (
            dataclasses.replace(s, output_length=o.output_length)
            for s, o in zip(scaled, original, strict=True)
        ),
        path,
    )
    return path


def fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def main() -> None:
    # SIGTERM takes Ctrl-C's path, so the fleet and gateway of the run in progress are stopped on the way out
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--policies", default=",".join([*ORDER, *sorted(set(POLICIES) - set(ORDER))]))
    parser.add_argument(
        "--trace", type=Path, default=TRACE, help=f"the Mooncake conversation trace [default: {TRACE}]"
    )
    parser.add_argument("--window-s", type=float, default=900.0, help="the trace's first seconds")
    parser.add_argument("--conversation-every", type=int, default=6, help="keep 1 conversation in N")
    parser.add_argument("--rate-scale", type=float, default=30.0, help="speed the trace's arrivals up")
    parser.add_argument(
        "--length-scale", type=float, default=0.125, help="scale prompt lengths (hash blocks stay whole)"
    )
    parser.add_argument("--time-scale", type=float, default=1.0, help="stretch engine durations")
    parser.add_argument("--ttft-slo-ms", type=float, default=2000.0)
    parser.add_argument("--tpot-slo-ms", type=float, default=100.0)
    parser.add_argument(
        "--precise",
        default="prefix_aware,kv_cost",
        help="policies to run once more with engine KV events feeding a precise prefix index ('' for none)",
    )
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md")
    args = parser.parse_args()
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    precise = [p.strip() for p in args.precise.split(",") if p.strip()]
    unknown = sorted(set(policies + precise) - set(POLICIES))
    if unknown:
        parser.error(f"unknown policies {unknown}; valid: {sorted(POLICIES)}")

    rows = []
    with tempfile.TemporaryDirectory(prefix="routing_live_") as tmp:
        work = Path(tmp)
        trace = trace_slice(args.trace, args.window_s, args.conversation_every, args.length_scale, work)
        requests = sum(1 for _ in trace.open())
        runs = [(policy, False) for policy in policies] + [(policy, True) for policy in precise]
        for policy, kv_events in runs:
            started = time.monotonic()
            result, hit_rate = run_policy(policy, args, trace, work, kv_events)
            s = result.summary
            attainment = s.goodput * s.duration_s / s.sent if s.goodput is not None and s.sent else None
            cells = [
                f"{policy} (KV events)" if kv_events else policy,
                f"{s.completed}/{s.sent}",
                fmt(s.ttft_ms.median),
                fmt(s.ttft_ms.p99),
                fmt(s.tpot_ms.median, 1),
                fmt(s.tpot_ms.p99, 1),
                f"{100 * (attainment or 0):.1f}%",
                f"{100 * hit_rate:.1f}%",
            ]
            row = "| " + " | ".join(cells) + " |"
            rows.append(row)
            print(row, f"({time.monotonic() - started:.0f} s, failures {s.failures})", flush=True)

    fleet = ", ".join(f"{n} x {gpu}" for _, gpu, n in FLEET)
    command = " ".join(["python benchmarks/routing_live.py", *sys.argv[1:]])
    now = datetime.datetime.now(datetime.UTC)
    header = (
        "| policy | completed | TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 | SLO attainment | prefix hits |"
    )
    section = "\n".join(
        [
            f"## Routing policies live on the Mooncake conversation trace ({now:%Y-%m-%d %H:%M} UTC)",
            "",
            f"- machine: {os.cpu_count()} cores ({cpu_model()}), Python {platform.python_version()}, "
            "shared with other jobs",
            f"- command: `{command}`",
            f"- fleet: {fleet} emulated engines serving {MODEL} (time_scale {args.time_scale}, 8 tokens "
            "per stream chunk), a fresh fleet (cold caches) per "
            "policy, the gateway's default settings",
            f"- workload: Mooncake conversation trace (kvcache-ai/Mooncake FAST25-release, Apache-2.0), "
            f"its first {args.window_s:.0f} s, every {args.conversation_every}th conversation "
            f"({requests} requests), prompt lengths scaled by "
            f"{args.length_scale} (hash blocks too, so the prefix sharing is the trace's), outputs as "
            f"recorded, arrivals sped up {args.rate_scale}x, streaming completions",
            f"- SLO: TTFT <= {args.ttft_slo_ms:.0f} ms and TPOT <= {args.tpot_slo_ms:.0f} ms; prefix hits = "
            "the engines' vllm:prefix_cache_hits_total / queries_total over the run; latencies in ms",
            "- prefix knowledge: approximate (each cache-aware policy learns from its own routing decisions)"
            " unless the row says `(KV events)`: then the engines publish vLLM-format KV events over ZMQ"
            " and the gateway's precise index, fed by them, is what the policy reads",
            "",
            header,
            "|---|---|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    print(section)
    if not args.no_write:
        record(section)


if __name__ == "__main__":
    main()
