"""Run one benchmark against an older checkout and this one, alternating, and compare the medians.

    python benchmarks/side_by_side.py --baseline /tmp/old --repeats 3 \\
        --figure 'wall ([0-9.]+) s' -- benchmarks/sim_speed.py -n 1000000 --no-append

Each repeat runs the command once with the baseline's `src/` first on PYTHONPATH (so it, and every
fleetserve process it starts, runs the old code) and once with this checkout's, so both see the same
machine load. `--figure` is a regular expression whose first group is the number to compare, read from
the command's output (several matches: the first). The medians, their ratio and every run are printed
and, unless --no-record, appended to docs/benchmarks.md. Make a baseline checkout with
`git worktree add /tmp/old <commit>` (and `git worktree remove /tmp/old` afterwards).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

from common import ROOT, cpu_model, record


def run_once(command: list[str], src: Path, pattern: re.Pattern[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(src)}
    done = subprocess.run(
        [sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )
    found = pattern.search(done.stdout)
    if done.returncode != 0 or found is None:
        raise SystemExit(
            f"{' '.join(command)} with {src} failed (exit {done.returncode}) or printed no figure:\n"
            f"{done.stdout[-2000:]}{done.stderr[-2000:]}"
        )
    return float(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--baseline", type=Path, required=True, help="Checkout of the code to compare with.")
    parser.add_argument("--repeats", type=int, default=3, help="Runs of each side.")
    parser.add_argument("--figure", required=True, help="Regex; its first group is the figure.")
    parser.add_argument("--label", default="", help="What the figure is, for the record (e.g. 'wall s').")
    parser.add_argument("--no-record", action="store_true", help="Do not append to docs/benchmarks.md.")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the benchmark and its arguments.")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the benchmark command after --")
    pattern = re.compile(args.figure)
    sides = {"baseline": args.baseline.resolve() / "src", "this": ROOT / "src"}
    figures: dict[str, list[float]] = {side: [] for side in sides}
    for repeat in range(args.repeats):
        for side, src in sides.items():
            figures[side].append(run_once(command, src, pattern))
            print(f"repeat {repeat + 1}: {side} {figures[side][-1]:g}", flush=True)
    base, this = statistics.median(figures["baseline"]), statistics.median(figures["this"])
    baseline_commit = subprocess.run(
        ["git", "-C", str(args.baseline), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    this_commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    lines = [
        f"- command: `python benchmarks/side_by_side.py --baseline OLD --repeats {args.repeats} "
        f"--figure '{args.figure}' -- {' '.join(command)}`",
        f"- machine: {os.cpu_count()} cores, {cpu_model()}",
        f"- baseline {baseline_commit}: {', '.join(f'{v:g}' for v in figures['baseline'])} (median {base:g})",
        f"- this {this_commit}: {', '.join(f'{v:g}' for v in figures['this'])} (median {this:g})",
        f"- ratio this / baseline: {this / base:.3f}" + (f" ({args.label})" if args.label else ""),
    ]
    print("\n".join(lines))
    if not args.no_record:
        date = subprocess.run(["date", "-u"], capture_output=True, text=True, check=True).stdout.strip()
        title = f"## Side by side: {command[0]}" + (f", {args.label}" if args.label else "") + f" ({date})"
        record(title + "\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
