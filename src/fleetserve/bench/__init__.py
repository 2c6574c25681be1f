"""Load generator for live OpenAI-compatible endpoints: streaming client, arrival schedules, metrics,
reports and side-by-side comparisons. `run_bench(BenchConfig(...))` runs one benchmark."""

from fleetserve.bench.metrics import SLO, Summary
from fleetserve.bench.runner import BenchConfig, BenchResult, run_bench

__all__ = ["SLO", "BenchConfig", "BenchResult", "Summary", "run_bench"]
