"""Autoscaling live, with the twin beside it: a burst through `fleetserve serve` over emulated engines
(each a process this machine starts and stops), the load generator (`fleetserve bench`) replaying the
trace, the replicas read from the admin API every second; then the same fleet file and trace in the
simulator, whose engines start in the median time the live ones took. Figures: requests failed as
the client sees them (must be 0), TTFT, the scale events of both, and replicas over time.

    python benchmarks/autoscale_live.py                  # ~3 min
    python benchmarks/autoscale_live.py --no-write
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from common import answers, free_port, free_ports, publish, section_head, stop_process_group
from fleetserve.config import FleetConfig
from fleetserve.sim import simulate
from fleetserve.workload import TraceRequest, read_trace, write_jsonl
from fleetserve.workload.generators import FixedLengths, WorkloadSpec, generate

FLEETSERVE = str(Path(sys.executable).with_name("fleetserve"))
PHASES = ((1.0, 30.0), (12.0, 40.0), (1.0, 60.0))  # (requests/s, seconds): quiet, burst, quiet
AUTOSCALE = {
    "policy": "kpa", "max_replicas": 6, "metric": "in_flight", "target": 4, "interval_s": 1,
    "stable_window_s": 20, "panic_window_s": 6, "scale_down_cooldown_s": 20,
}  # fmt: skip


def make_trace() -> list[TraceRequest]:
    lengths = {"input_lengths": FixedLengths(256), "output_lengths": FixedLengths(128)}
    trace: list[TraceRequest] = []
    start_ms = 0.0
    for index, (rate, seconds) in enumerate(PHASES):
        phase = generate(WorkloadSpec(rate, duration_s=seconds, seed=index, **lengths))
        trace += [TraceRequest(r.timestamp_ms + start_ms, r.input_length, r.output_length) for r in phase]
        start_ms += seconds * 1000.0
    return trace


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def sample(admin: str, samples: list[tuple[float, int, int]], stop: threading.Event, t0: float) -> None:
    """(seconds since t0, ready, starting) every second."""
    while not stop.wait(1.0):
        engines = get_json(admin + "/engines")["engines"]
        states = [engine["state"] for engine in engines]
        samples.append((time.monotonic() - t0, states.count("ready"), states.count("starting")))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--no-write", action="store_true", help="Print only; leave docs/benchmarks.md alone.")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="autoscale-live-"))
    trace = make_trace()
    write_jsonl(trace, work / "trace.jsonl")
    port, admin_port = free_port(), free_port()
    fleet = {
        "engines": [{"name": "l4", "gpu": "l4", "model": "llama-3-8b", "autoscale": AUTOSCALE}],
        "emulator": {"base_port": free_ports(1)[0]},
        "gateway": {"port": port, "admin_port": admin_port, "health_interval_s": 0.2},
    }
    (work / "fleet.yaml").write_text(yaml.safe_dump(fleet))
    url, admin = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"
    with (work / "serve.log").open("wb") as log:
        serve = subprocess.Popen(
            [FLEETSERVE, "serve", "-c", str(work / "fleet.yaml")], stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    samples: list[tuple[float, int, int]] = []
    stop = threading.Event()
    try:
        deadline = time.monotonic() + 60
        while not answers(url + "/ready"):
            if time.monotonic() > deadline:
                raise SystemExit("the gateway did not become ready:\n" + (work / "serve.log").read_text())
            time.sleep(0.2)
        t0 = time.monotonic()
        sampler = threading.Thread(target=sample, args=(admin, samples, stop, t0), daemon=True)
        sampler.start()
        subprocess.run(
            [FLEETSERVE, "bench", "--url", url, "--model", "llama-3-8b", "--trace", str(work / "trace.jsonl"),
             "--json", str(work / "bench.json"), "--quiet"],
            check=True,
        )  # fmt: skip
        deadline = time.monotonic() + 90  # the quiet after it brings the group back to one replica
        while len(get_json(admin + "/engines")["engines"]) > 1 and time.monotonic() < deadline:
            time.sleep(1.0)
        stop.set()
        sampler.join()
        live_events = get_json(admin + "/autoscale")["scale_events"]
        log_text = (work / "serve.log").read_text()
    finally:
        stop.set()
        stop_process_group(serve)
    report = json.loads((work / "bench.json").read_text())["summary"]
    started = [line for line in log_text.splitlines() if " started at http" in line]
    # the engines' start times, read from the log: "engine l4-0 ... started" after the decision to start
    startup = _startup_seconds(log_text)
    cold_start = statistics.median(startup) if startup else 2.0

    config = FleetConfig.model_validate(
        {**fleet, "engines": [{**fleet["engines"][0], "cold_start_s": round(cold_start, 2)}]}
    )
    twin = simulate(config, read_trace(work / "trace.jsonl")).summary
    lines = section_head(
        "Autoscaling live and in the twin: a burst (emulated L4s, llama-3-8b)", "autoscale_live.py"
    )
    lines += [
        f"- trace: {len(trace)} requests, 256-token prompts, 128-token answers: "
        + ", then ".join(f"{rate:g} req/s for {seconds:g} s" for rate, seconds in PHASES),
        f"- autoscaler: {AUTOSCALE} (AIBrix's KPA arithmetic, windows shortened for a 2-minute run)",
        f"- live engines started by serve as processes: {len(started)}; median time from the decision to"
        f" ready {cold_start:.2f} s (the twin's cold_start_s)",
        "",
        "| side | requests | failed | TTFT p50 (ms) | TTFT p99 (ms) | peak replicas | scale events |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
        f"| live | {report['sent']} | {report['failed']} | {report['ttft_ms']['median']:.0f}"
        f" | {report['ttft_ms']['p99']:.0f} | {max((r + s for _, r, s in samples), default=1)}"
        f" | {_events(live_events)} |",
        f"| twin | {twin['requests']} | {twin['failed']} | {twin['ttft_ms']['p50']:.0f}"
        f" | {twin['ttft_ms']['p99']:.0f} | {max((e['to'] for e in twin['scale_events']), default=1)}"
        f" | {_events(twin['scale_events'])} |",
        "",
        "Live replicas (ready + starting) every 10 s: "
        + ", ".join(f"{int(t):d} s: {r}+{s}" for t, r, s in samples[::10]),
    ]
    publish("\n".join(lines) + "\n", not args.no_write)


def _events(events: list[dict[str, Any]]) -> str:
    return ", ".join(f"{e['t_s']:.0f} s {e['from']}->{e['to']} ({e['reason']})" for e in events) or "-"


def _startup_seconds(log_text: str) -> list[float]:
    """Seconds from each decision that grew the group (`autoscale l4: A -> B replicas`, B - A engines
    asked for) to the `started at` lines of the engines it asked for, in order, from the serve log."""
    asked: list[datetime.datetime] = []
    waits = []
    for line in log_text.splitlines():
        stamp = line[:23]
        grew = re.search(r"autoscale l4: (\d+) -> (\d+) replicas", line)
        if grew and int(grew[2]) > int(grew[1]):
            asked += [datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f")] * (
                int(grew[2]) - int(grew[1])
            )
        elif " started at http" in line and asked:
            ready = datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f")
            waits.append((ready - asked.pop(0)).total_seconds())
    return waits


if __name__ == "__main__":
    main()
