"""Fingerprints of the simulator's per-request results, to show a refactoring changed no outcome.

For each scenario it prints the SHA-256 of every request's arrival, first-token and finish times, output
and cached tokens and engine, plus the failure counts. Run it before and after a change (on the old
commit: `PYTHONPATH=/tmp/old/src`) and compare the lines; a scenario whose line differs changed results.

Scenarios: every registered routing policy on examples/hetero-fleet.yaml replaying the first 1,500
requests of the Mooncake conversation trace (shared prefixes via hash_ids; ../shared/data/traces,
Apache-2.0) at the fleet file's sync interval, two of them again with sync_interval_s=0, and 20,000
Poisson requests of the Azure conversation length mix on sim_speed.py's 64-engine fleet.

    .venv/bin/python benchmarks/sim_fingerprint.py
"""

from __future__ import annotations

import hashlib
import sys

import numpy as np

from common import ROOT, shared_trace
from fleetserve.config import load_fleet
from fleetserve.routing.registry import POLICIES
from fleetserve.sim import SimOptions, simulate
from fleetserve.workload.readers import read_trace

sys.path.insert(0, str(ROOT / "benchmarks"))
import sim_speed


def fingerprint(result) -> str:
    arrays = result.requests
    digest = hashlib.sha256()
    for name in ("arrival", "first_token", "finish", "output_tokens", "cached_tokens", "engine"):
        digest.update(np.ascontiguousarray(getattr(arrays, name)).tobytes())
    digest.update(repr(sorted(result.summary["failures"].items())).encode())
    return digest.hexdigest()[:16]


def main() -> None:
    config = load_fleet(ROOT / "examples" / "hetero-fleet.yaml")
    trace = read_trace(shared_trace("mooncake_conversation.jsonl"))[:1500]
    for policy in sorted(POLICIES):
        print(f"hetero/mooncake-1500/{policy}: {fingerprint(simulate(config, trace, policy, 0))}")
    for policy in ("least_request", "prefix_aware"):
        result = simulate(config, trace, policy, 0, options=SimOptions(sync_interval_s=0.0))
        print(f"hetero/mooncake-1500/{policy}/sync0: {fingerprint(result)}")
    lengths = sim_speed.azure_lengths()
    rate = sim_speed.fleet_rate(0.5, float(lengths[:, 1].mean()))
    poisson = sim_speed.poisson_trace(20_000, rate, lengths, 0)
    result = simulate(sim_speed.fleet_config(True), poisson, "least_request", 0)
    print(f"sim_speed-64/azure-20000/least_request: {fingerprint(result)}")


if __name__ == "__main__":
    main()
