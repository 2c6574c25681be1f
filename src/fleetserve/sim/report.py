"""A self-contained HTML report of one or more simulation summaries: a table, latency CDFs per policy,
SLO attainment against arrival rate, and per-engine load over time. Figures are matplotlib PNGs embedded
as base64, so the page is one file that opens anywhere."""

from __future__ import annotations

import base64
import html
import io
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: the report is rendered headless, also inside worker processes

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

MAX_CDF_FIGURES = 6
MAX_ENGINE_LINES = 16


def render_report(results: Sequence[dict[str, Any]], path: str | Path, title: str = "fleetserve sim") -> None:
    sections = [f"<h1>{html.escape(title)}</h1>", _table(results)]
    sections += _cdf_sections(results)
    attainment = _attainment_vs_rate(results)
    if attainment:
        sections.append(attainment)
    sections += [_load_section(result) for result in results if result.get("load_over_time")]
    sections += [_replicas_section(result) for result in results if result.get("scale_events") is not None]
    page = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        + "\n".join(sections)
        + "</body></html>"
    )
    Path(path).write_text(page)


_CSS = (
    "body{font-family:system-ui,sans-serif;margin:2em;color:#222}"
    "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
    "th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}img{max-width:100%}"
)


def _label(result: dict[str, Any], with_rate: bool = False) -> str:
    label = str(result.get("policy"))
    if result.get("fleet_name"):
        label = f"{result['fleet_name']} / {label}"
    if with_rate and result.get("rate_rps") is not None:
        label += f" @ {result['rate_rps']:.3g} rps"
    return label


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(results: Sequence[dict[str, Any]]) -> str:
    header = [
        "run", "requests", "failed", "SLO attainment", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms",
        "E2E p99 ms", "goodput rps", "tokens/s", "prefix hit", "cost $", "$/M tokens",
    ]  # fmt: skip
    rows = []
    for r in results:
        cells = [
            html.escape(_label(r, with_rate=True)),
            _fmt(r["requests"]),
            _fmt(r.get("failed")),
            f"{r['slo_attainment']:.1%}",
            _fmt(r["ttft_ms"]["p50"]),
            _fmt(r["ttft_ms"]["p99"]),
            _fmt(r["tpot_ms"]["p50"]),
            _fmt(r["e2e_ms"]["p99"]),
            _fmt(r["goodput_rps"], 2),
            _fmt(r["throughput_tok_s"], 0),
            f"{r['prefix_hit_rate']:.1%}",
            _fmt(r["cost_usd"], 2),
            _fmt(r.get("cost_per_million_tokens_usd"), 3),
        ]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    head = "<tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr>"
    return f"<h2>Summary</h2><table>{head}{''.join(rows)}</table>"


def _png(figure: Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"<img src='data:image/png;base64,{encoded}'>"


def _cdf_sections(results: Sequence[dict[str, Any]]) -> list[str]:
    """One figure per arrival rate, one line per fleet/policy, for TTFT and end-to-end latency."""
    by_rate: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for result in results:
        if result.get("latency_quantiles", {}).get("ttft_ms"):
            by_rate[result.get("rate_rps")].append(result)
    sections = []
    for rate, group in sorted(by_rate.items(), key=lambda item: item[0] or 0)[:MAX_CDF_FIGURES]:
        figure, axes = plt.subplots(1, 2, figsize=(11, 4))
        for result in group:
            for axis, key in zip(axes, ("ttft_ms", "e2e_ms"), strict=True):
                values = result["latency_quantiles"][key]
                axis.plot(values, np.linspace(0, 1, len(values)), label=_label(result))
        for axis, name in zip(axes, ("time to first token (ms)", "end-to-end latency (ms)"), strict=True):
            axis.set_xscale("log")
            axis.set_xlabel(name)
            axis.set_ylabel("fraction of requests")
            axis.grid(alpha=0.3)
        axes[0].legend(fontsize="small")
        where = f" at {rate:.3g} requests/s" if rate is not None else ""
        sections.append(f"<h2>Latency CDFs{where}</h2>{_png(figure)}")
    return sections


def _attainment_vs_rate(results: Sequence[dict[str, Any]]) -> str | None:
    lines: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for result in results:
        if result.get("rate_rps") is not None:
            lines[_label(result)].append((result["rate_rps"], result["slo_attainment"]))
    if not any(len(points) > 1 for points in lines.values()):
        return None
    figure, axis = plt.subplots(figsize=(7, 4))
    for label, points in lines.items():
        points.sort()
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    axis.set_xlabel("arrival rate (requests/s)")
    axis.set_ylabel("SLO attainment")
    axis.set_ylim(0, 1.02)
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small")
    return f"<h2>SLO attainment against arrival rate</h2>{_png(figure)}"


def _replicas_section(result: dict[str, Any]) -> str:
    """Replicas asked for per autoscaled group over time (a step at each scale event), with the arrival
    rate on a second axis."""
    figure, axis = plt.subplots(figsize=(11, 4))
    end = result["duration_s"]
    for group in result["autoscale"]:
        events = [event for event in result["scale_events"] if event["group"] == group]
        start = result["autoscale"][group]["replicas_at_start"]
        times = [0.0, *(event["t_s"] for event in events), end]
        counts = [start, *(event["to"] for event in events), events[-1]["to"] if events else start]
        axis.step(times, counts, where="post", label=f"{group} replicas")
    axis.set_xlabel("simulated time (s)")
    axis.set_ylabel("replicas")
    axis.grid(alpha=0.3)
    rate = result.get("arrival_rate_over_time", {})
    if rate.get("t_s"):
        arrivals = axis.twinx()
        arrivals.plot(rate["t_s"], rate["rps"], color="grey", linewidth=0.8, label="arrivals per second")
        arrivals.set_ylabel("arrivals per second")
        arrivals.legend(fontsize="small", loc="upper right")
    axis.legend(fontsize="small", loc="upper left")
    title = html.escape(_label(result, with_rate=True))
    return f"<h2>Replicas over time: {title}</h2>{_png(figure)}"


def _load_section(result: dict[str, Any]) -> str:
    load = result["load_over_time"]
    times = load["t_s"]
    in_flight: dict[str, list[int]] = load["in_flight"]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    # 20 distinct colours: the default cycle has 10, so engines 11-16 would repeat the first ones
    for axis in axes:
        axis.set_prop_cycle(color=plt.get_cmap("tab20").colors)
    for engine_id, series in list(in_flight.items())[:MAX_ENGINE_LINES]:
        axes[0].plot(times, series, linewidth=0.8, label=engine_id)
        axes[1].plot(times, load["kv_usage"][engine_id], linewidth=0.8, label=engine_id)
    if len(in_flight) > MAX_ENGINE_LINES:
        mean = np.mean(np.array(list(in_flight.values()), dtype=float), axis=0)
        axes[0].plot(times, mean, color="black", linewidth=2, label="mean of all")
    axes[0].set_ylabel("requests in flight")
    axes[1].set_ylabel("KV cache usage")
    for axis in axes:
        axis.set_xlabel("simulated time (s)")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize="x-small", ncol=2)
    title = html.escape(_label(result, with_rate=True))
    return f"<h2>Per-engine load over time: {title}</h2>{_png(figure)}"
