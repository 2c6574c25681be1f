"""`fleetserve workload`: generate, convert and summarise request traces."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click
import orjson

from fleetserve.errors import InputError
from fleetserve.workload.generators import ARRIVALS, WorkloadSpec, generate, parse_length_spec
from fleetserve.workload.readers import FORMATS, read_trace
from fleetserve.workload.stats import PERCENTILES, summarize
from fleetserve.workload.trace import TraceFormatError, TraceRequest, write_jsonl
from fleetserve.workload.transform import TransformSpec, apply_transforms

F = TypeVar("F", bound=Callable[..., Any])


def transform_options(command: F) -> F:
    """The trace transforms every workload command accepts; they run in the order listed here."""
    options = [
        click.option("--start", type=float, help="Drop requests before this many seconds into the trace."),
        click.option(
            "--end",
            type=float,
            help="Drop requests from this many seconds on. Kept requests are re-based "
            "so --start becomes time 0.",
        ),
        click.option(
            "--sample",
            type=click.FloatRange(0, 1),
            help="Keep this fraction of requests (whole sessions), chosen by --sample-seed.",
        ),
        click.option("--sample-seed", type=int, default=0, show_default=True, help="Seed for --sample."),
        click.option(
            "--rate-scale",
            type=click.FloatRange(min=0, min_open=True),
            default=1.0,
            show_default=True,
            help="Multiply the arrival rate (2 halves every timestamp).",
        ),
        click.option(
            "--length-scale",
            type=click.FloatRange(min=0, min_open=True),
            default=1.0,
            show_default=True,
            help="Multiply input and output lengths; the hash block size scales along so prefix sharing "
            "is kept (block size x scale must stay whole).",
        ),
        click.option("--limit", type=click.IntRange(min=0), help="Keep only the first N requests."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _apply_transforms(requests: list[TraceRequest], options: dict[str, Any]) -> list[TraceRequest]:
    spec = TransformSpec(
        start_s=options["start"],
        end_s=options["end"],
        sample=options["sample"],
        sample_seed=options["sample_seed"],
        rate_scale=options["rate_scale"],
        length_scale=options["length_scale"],
        max_input=options.get("max_input"),
        max_output=options.get("max_output"),
        limit=options["limit"],
    )
    try:
        return apply_transforms(requests, spec)
    except InputError as error:
        raise click.UsageError(str(error)) from None


def _read(path: str, fmt: str, keep_failed: bool) -> list[TraceRequest]:
    try:
        return read_trace(path, fmt, keep_failed=keep_failed)
    except TraceFormatError as error:
        raise click.ClickException(str(error)) from None


def _write(requests: list[TraceRequest], output: str, asked_rate: float | None = None) -> None:
    """Write the trace and say what it holds: its size and its offered rate (arrivals over the span from
    the first arrival to the last), beside the rate asked for when it differs."""
    written = write_jsonl(requests, output)
    line = f"wrote {written} requests to {output}"
    if len(requests) >= 2:
        span_s = (requests[-1].timestamp_ms - requests[0].timestamp_ms) / 1000.0
        if span_s > 0:
            offered = (len(requests) - 1) / span_s
            line += f": {offered:.2f} req/s offered over {span_s:.0f} s"
            if asked_rate is not None and abs(offered - asked_rate) > 0.05 * asked_rate:
                line += (
                    f" (asked for {asked_rate:g} req/s: a conversation ends early when the window closes or"
                    " its next prompt would pass --max-input, which lowers the rate; so do --sample and"
                    " --limit)"
                )
    click.echo(line, err=True)


trace_format_option = click.option(
    "--format",
    "fmt",
    type=click.Choice(("auto", *FORMATS)),
    default="auto",
    show_default=True,
    help="Trace format; auto looks at the extension and the CSV header.",
)
keep_failed_option = click.option(
    "--keep-failed",
    is_flag=True,
    help="BurstGPT: keep failed requests (Response tokens 0), skipped by default.",
)
output_option = click.option(
    "-o", "--out", default="-", show_default=True, help="Where to write the JSONL trace (- is stdout)."
)


@click.group()
def workload() -> None:
    """Generate, convert and summarise request traces.

    Traces are read from fleetserve JSONL (a superset of Mooncake's format), Azure LLM inference CSV,
    BurstGPT CSV, Vidur CSV and splitwise-sim CSV, and written as fleetserve JSONL.
    """


def _parse_models(values: tuple[str, ...]) -> list[tuple[str, float]]:
    models = []
    for value in values:
        name, _, weight = value.partition("=")
        try:
            models.append((name, float(weight) if weight else 1.0))
        except ValueError:
            raise click.BadParameter(f"{value!r} is not NAME or NAME=WEIGHT", param_hint="--model") from None
    return models


@workload.command()
@click.option(
    "--arrival",
    type=click.Choice(ARRIVALS),
    help="Arrival process [default: gamma when --burstiness is given, else poisson]. Gamma gaps with "
    "--burstiness K have CV^2 = 1/K.",
)
@click.option(
    "--rate", type=click.FloatRange(min=0, min_open=True), required=True, help="Mean requests per second."
)
@click.option(
    "--burstiness",
    type=click.FloatRange(min=0, min_open=True),
    help="Gamma shape K: 1 is Poisson, below 1 burstier, above 1 smoother.",
)
@click.option(
    "--diurnal",
    type=click.FloatRange(min=1),
    default=1.0,
    show_default=True,
    help="Peak-to-trough ratio of a daily rhythm: the rate swings from a trough at 0 to a peak this many"
    " times higher half a --period later, around the same mean --rate (1: flat). With --burstiness the"
    " arrivals are bursty too.",
)
@click.option(
    "--period",
    type=click.FloatRange(min=0, min_open=True),
    default=86400.0,
    show_default=True,
    help="Seconds of one --diurnal cycle (3600: a day compressed into an hour).",
)
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), help="Generate this many seconds.")
@click.option(
    "--num", type=click.IntRange(min=0), help="Generate this many requests (instead of --duration)."
)
@click.option(
    "--input",
    "input_spec",
    default="zipf:1024",
    show_default=True,
    help="Prompt length of each new user message: fixed:N, uniform:LOW:HIGH, zipf:MEAN[:THETA] or "
    "empirical:TRACE (resample a trace's input lengths).",
)
@click.option(
    "--output",
    "output_spec",
    default="zipf:256",
    show_default=True,
    help="Answer length, same forms as --input (empirical:TRACE resamples output lengths).",
)
@click.option(
    "--max-input",
    type=click.IntRange(min=1),
    default=131072,
    show_default=True,
    help="Context window: longer prompts are cut, and a session ends once its context exceeds it.",
)
@click.option(
    "--max-output",
    type=click.IntRange(min=1),
    default=16384,
    show_default=True,
    help="Longest answer; longer draws are cut.",
)
@click.option(
    "--sessions",
    "turns",
    type=click.FloatRange(min=1),
    default=1.0,
    show_default=True,
    help="Mean turns per conversation (geometric). Each turn's prompt is the previous prompt, its answer "
    "and a new message, so its hash ids extend the previous turn's. 1 = single-turn requests.",
)
@click.option(
    "--think-time",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="Mean seconds (exponential) between a conversation's turns.",
)
@click.option(
    "--tenants",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Number of tenants (tenant-0..); 0 leaves requests untagged.",
)
@click.option(
    "--tenant-zipf",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Zipf exponent of tenant popularity (0 = uniform).",
)
@click.option(
    "--tenant-share",
    "tenant_shares",
    type=click.FloatRange(min=0, min_open=True),
    multiple=True,
    metavar="SHARE",
    help="Relative request rate of tenant-0, tenant-1, ... in order; repeat once per tenant (sets"
    " --tenants), e.g. --tenant-share 10 --tenant-share 1 --tenant-share 1 for one tenant flooding.",
)
@click.option(
    "--system-prompt",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Tokens of a system prompt each tenant shares; its whole blocks get the same hash ids "
    "within a tenant. Needs --tenants.",
)
@click.option(
    "--adapters",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Number of LoRA adapters (lora-0..); 0 sends every request to the base model.",
)
@click.option(
    "--adapter-zipf",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="Zipf exponent of adapter popularity (0 = uniform).",
)
@click.option(
    "--adapter-fraction",
    type=click.FloatRange(0, 1),
    default=1.0,
    show_default=True,
    help="Share of conversations that use an adapter at all.",
)
@click.option("--adapter-prefix", default="lora-", show_default=True, help="Adapter name prefix.")
@click.option(
    "--model",
    "models",
    multiple=True,
    metavar="NAME[=WEIGHT]",
    help="Model to tag requests with; repeat for a weighted mix. Untagged when not given.",
)
@click.option(
    "--block-size", type=click.IntRange(min=1), default=512, show_default=True, help="Tokens per hash block."
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed; the same seed gives the same trace."
)
@output_option
@transform_options
def gen(
    arrival: str | None,
    rate: float,
    burstiness: float | None,
    diurnal: float,
    period: float,
    duration: float | None,
    num: int | None,
    input_spec: str,
    output_spec: str,
    max_input: int,
    max_output: int,
    turns: float,
    think_time: float,
    tenants: int,
    tenant_zipf: float,
    tenant_shares: tuple[float, ...],
    system_prompt: int,
    adapters: int,
    adapter_zipf: float,
    adapter_fraction: float,
    adapter_prefix: str,
    models: tuple[str, ...],
    block_size: int,
    seed: int,
    out: str,
    **transforms: Any,
) -> None:
    """Generate a seeded synthetic trace as JSONL.

    \b
    Examples:
      fleetserve workload gen --rate 5 --duration 600 -o chat.jsonl
      fleetserve workload gen --arrival gamma --rate 20 --burstiness 0.25 --num 10000 \\
          --input empirical:azure_llm_2023_conv.csv --output empirical:azure_llm_2023_conv.csv
      fleetserve workload gen --rate 2 --duration 3600 --sessions 4 --tenants 8 --system-prompt 2048 \\
          --adapters 50 --adapter-zipf 1.2 -o agents.jsonl
      fleetserve workload gen --rate 30 --duration 300 --tenant-share 10 --tenant-share 1 \
          --tenant-share 1 -o flood.jsonl
      fleetserve workload gen --rate 10 --duration 3600 --diurnal 6 --period 3600 \
          --burstiness 0.5 -o day.jsonl
    """
    if (duration is None) == (num is None):
        raise click.UsageError("give exactly one of --duration and --num")
    if arrival is None:
        arrival = "poisson" if burstiness is None else "gamma"
    try:
        spec = WorkloadSpec(
            rate=rate,
            num_requests=num,
            duration_s=duration,
            arrival=arrival,
            burstiness=1.0 if burstiness is None else burstiness,
            diurnal=diurnal,
            period_s=period,
            input_lengths=parse_length_spec(input_spec, side="input"),
            output_lengths=parse_length_spec(output_spec, side="output"),
            max_input_length=max_input,
            max_output_length=max_output,
            turns=turns,
            think_time_s=think_time,
            tenants=len(tenant_shares) or tenants,
            tenant_zipf=tenant_zipf,
            tenant_shares=tenant_shares,
            system_prompt_tokens=system_prompt,
            adapters=adapters,
            adapter_zipf=adapter_zipf,
            adapter_fraction=adapter_fraction,
            adapter_prefix=adapter_prefix,
            models=_parse_models(models),
            block_size=block_size,
            seed=seed,
        )
        requests = generate(spec)
    except TraceFormatError as error:  # an empirical length file that does not parse
        raise click.ClickException(str(error)) from None
    except InputError as error:
        raise click.UsageError(str(error)) from None
    _write(_apply_transforms(requests, transforms), out, asked_rate=rate * transforms["rate_scale"])


@workload.command()
@click.argument("trace", type=click.Path(dir_okay=False))
@trace_format_option
@keep_failed_option
@output_option
@transform_options
@click.option(
    "--max-input",
    type=click.IntRange(min=1),
    help="Cut prompts to N tokens (after length scaling), e.g. to fit a model's context; a cut prompt keeps"
    " its whole shared-prefix blocks.",
)
@click.option("--max-output", type=click.IntRange(min=1), help="Cut answers to N tokens.")
def convert(trace: str, fmt: str, keep_failed: bool, out: str, **transforms: Any) -> None:
    """Read TRACE in any supported format, apply the transforms, write fleetserve JSONL.

    \b
    Example (how src/fleetserve/data/demo_trace.jsonl is made):
      fleetserve workload convert mooncake_conversation.jsonl --end 180 --rate-scale 2 --length-scale 0.125 \\
          -o demo_trace.jsonl
    """
    _write(_apply_transforms(_read(trace, fmt, keep_failed), transforms), out)


@workload.command()
@click.argument("trace", type=click.Path(dir_okay=False))
@trace_format_option
@keep_failed_option
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@transform_options
def stats(trace: str, fmt: str, keep_failed: bool, as_json: bool, **transforms: Any) -> None:
    """Summarise TRACE: count, duration, rate, burstiness, length percentiles, prefix sharing
    (share of hash blocks that repeat an earlier block) and label counts."""
    summary = summarize(_apply_transforms(_read(trace, fmt, keep_failed), transforms))
    if as_json:
        click.echo(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode())
        return
    click.echo(_format_summary(trace, summary))


def _format_summary(trace: str, summary: dict[str, Any]) -> str:
    def number(value: float | None, digits: int = 2) -> str:
        if value is None:
            return "-"
        return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"

    percentile_names = [f"p{p}" for p in PERCENTILES]
    lines = [
        f"trace               {trace}",
        f"requests            {number(summary['requests'])}",
        f"duration            {number(summary['duration_s'])} s",
        f"mean rate           {number(summary['mean_rate_rps'], 3)} req/s",
        f"inter-arrival CV^2  {number(summary['interarrival_cv2'], 3)}",
        f"{'':20}{'mean':>10}" + "".join(f"{name:>10}" for name in percentile_names) + f"{'max':>10}",
    ]
    for key, title in (("input_length", "input tokens"), ("output_length", "output tokens")):
        row = summary[key]
        cells = [row["mean"], *(row[name] for name in percentile_names), row["max"]]
        lines.append(f"{title:20}" + "".join(f"{number(cell, 0):>10}" for cell in cells))
    ratio = summary["prefix_sharing_ratio"]
    lines += [
        f"prefix sharing      {'-' if ratio is None else f'{ratio:.1%}'} of {number(summary['hash_blocks'])} "
        f"hash blocks repeat an earlier block",
        f"requests w/ hashes  {number(summary['requests_with_hash_ids'])}",
        "labels              "
        + ", ".join(
            f"{summary[key]} {key}" for key in ("models", "adapters", "tenants", "sessions", "categories")
        ),
    ]
    return "\n".join(lines)
