"""Side by side: benchmark reports (the JSON `fleetserve bench` writes) as one table and one figure."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from rich.table import Table

from fleetserve.errors import InputError


@dataclass(frozen=True, slots=True)
class Report:
    name: str
    data: dict[str, Any]

    @property
    def summary(self) -> dict[str, Any]:
        return self.data["summary"]

    def per_request(self, key: str) -> list[float]:
        """One per-request value (seconds) over completed requests, e.g. "ttft" or "tpot"."""
        return [r[key] for r in self.data.get("requests", []) if r.get("ok") and r.get(key) is not None]


def load_reports(paths: Sequence[str | Path]) -> list[Report]:
    reports = []
    for path in paths:
        data = orjson.loads(Path(path).read_bytes())
        if not isinstance(data, dict) or "summary" not in data:
            raise InputError(f"{path} is not a fleetserve bench report")
        reports.append(Report(data.get("label") or Path(path).stem, data))
    return reports


def _number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    failures = summary["failures"]
    rows = [
        ("sent", str(summary["sent"])),
        ("completed", str(summary["completed"])),
        ("failed", str(summary["failed"])),
        ("failures", ", ".join(f"{kind} {count}" for kind, count in failures.items()) or "-"),
        ("duration (s)", _number(summary["duration_s"], 2)),
        ("offered req/s", _number(summary.get("offered_rps"), 2)),
        ("achieved req/s", _number(summary["request_throughput"], 2)),
        ("output tokens/s", _number(summary["output_token_throughput"], 1)),
        ("goodput (req/s)", _number(summary["goodput"], 2)),
    ]
    for metric, title in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E")):
        stats = summary[metric]
        for stat in ("mean", "median", "p90", "p99"):
            rows.append((f"{title} {stat} (ms)", _number(stats[stat], 2)))
    rows.append(("send lag p99 (ms)", _number(summary["send_lag_ms"]["p99"], 2)))
    return rows


def comparison_table(reports: Sequence[Report], title: str = "fleetserve bench") -> Table:
    """One column per run, one row per figure."""
    table = Table(title=title)
    table.add_column("metric", style="bold")
    for report in reports:
        table.add_column(report.name, justify="right")
    per_report = [_rows(report.summary) for report in reports]
    for position, (label, _) in enumerate(per_report[0] if per_report else []):
        table.add_row(label, *(rows[position][1] for rows in per_report))
    return table


def plot_reports(reports: Sequence[Report], path: str | Path) -> None:
    """TTFT, TPOT, ITL and E2E CDFs of every run, and a bar chart of offered, achieved and good rates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, axes = plt.subplots(2, 3, figsize=(15, 8))
    curves = (
        ("ttft", "TTFT"),
        ("tpot", "TPOT"),
        ("itl", "ITL (every gap between chunks)"),
        ("e2e", "E2E latency"),
    )
    for axis, (key, title) in zip(axes.flat[:4], curves, strict=True):
        for report in reports:
            if key == "itl":  # ITLs are pooled, not per request: the report keeps their quantiles
                values = np.asarray(report.summary.get("itl_quantiles_ms") or [])
                fractions = np.linspace(0, 1, len(values))
            else:
                values = np.sort(np.asarray(report.per_request(key)) * 1000.0)
                fractions = np.arange(1, len(values) + 1) / max(len(values), 1)
            if len(values):
                axis.plot(values, fractions, label=report.name)
        axis.set_title(f"{title} CDF")
        axis.set_xlabel("ms")
        axis.set_ylabel("fraction")
        axis.grid(alpha=0.3)
        if axis.has_data():
            axis.legend(fontsize="small")
    bars = axes.flat[4]
    positions = np.arange(len(reports))
    width = 0.27
    series = (
        ("offered req/s", [report.summary.get("offered_rps") or 0.0 for report in reports]),
        ("achieved req/s", [report.summary["request_throughput"] for report in reports]),
        ("goodput (req/s within SLO)", [report.summary["goodput"] or 0.0 for report in reports]),
    )
    for offset, (label, values) in zip((-width, 0.0, width), series, strict=True):
        bars.bar(positions + offset, values, width, label=label)
    bars.set_xticks(positions, [report.name for report in reports], rotation=20, ha="right")
    bars.set_title("request rates")
    # the legend gets the last panel to itself, so it never covers a bar
    legend = axes.flat[5]
    legend.axis("off")
    legend.legend(*bars.get_legend_handles_labels(), loc="center", fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
