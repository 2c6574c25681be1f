"""Read public LLM request traces into `TraceRequest`s.

Supported formats (`fmt`):

- ``jsonl``: fleetserve's own format, a superset of Mooncake's (see `trace.py`).
- ``azure``: Azure LLM inference traces 2023/2024, ``TIMESTAMP,ContextTokens,GeneratedTokens`` with
  TIMESTAMP a datetime string. The Splitwise paper's traces are these files.
- ``burstgpt``: BurstGPT, ``Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type`` with
  Timestamp in seconds. Rows with ``Response tokens`` 0 are failed requests and are skipped unless
  ``keep_failed`` is set: they put no decode load on an engine and would skew the output-length mix.
- ``vidur``: Vidur's processed traces, ``arrived_at,num_prefill_tokens,num_decode_tokens`` with arrived_at
  in seconds. Vidur's length-only files (no ``arrived_at``) are read with every timestamp 0, which makes
  them usable as an empirical length source.
- ``splitwise``: splitwise-sim's request traces, ``request_id,request_type,application_id,
  arrival_timestamp,batch_size,prompt_size,token_size`` with arrival_timestamp in seconds;
  application_id becomes the tenant.

CSV timestamps are converted to milliseconds relative to the earliest request.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

from fleetserve.errors import InputError
from fleetserve.workload.trace import TraceFormatError, TraceRequest, paused_gc, read_jsonl

FORMATS = ("jsonl", "azure", "burstgpt", "vidur", "splitwise")

# Columns that identify each CSV format (exact header names, after stripping spaces).
CSV_SIGNATURES: dict[str, tuple[str, ...]] = {
    "azure": ("TIMESTAMP", "ContextTokens", "GeneratedTokens"),
    "burstgpt": ("Timestamp", "Request tokens", "Response tokens"),
    "vidur": ("num_prefill_tokens", "num_decode_tokens"),
    "splitwise": ("arrival_timestamp", "prompt_size", "token_size"),
}


def read_trace(path: str | Path, fmt: str = "auto", *, keep_failed: bool = False) -> list[TraceRequest]:
    """Read a trace file in `fmt` (or the format `detect_format` finds), ordered as in the file."""
    path = Path(path)
    if not path.is_file():
        raise TraceFormatError(path, "no such file")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt == "jsonl":
        return read_jsonl(path)
    if fmt not in CSV_SIGNATURES:
        raise TraceFormatError(path, f"unknown trace format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return _read_csv(path, fmt, keep_failed=keep_failed)


def detect_format(path: str | Path) -> str:
    """The trace format of `path`, from its extension and, for CSV files, its header line."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    with open(path, encoding="utf-8", newline="") as handle:
        first_line = handle.readline()
    if first_line.lstrip().startswith("{"):
        return "jsonl"
    header = {name.strip() for name in next(csv.reader([first_line]), [])}
    for fmt, columns in CSV_SIGNATURES.items():
        if header.issuperset(columns):
            return fmt
    expected = "; ".join(f"{fmt}: {','.join(columns)}" for fmt, columns in CSV_SIGNATURES.items())
    raise TraceFormatError(
        path, f"cannot tell the trace format from the header {sorted(header)}; expected columns {expected}", 1
    )


# A row parser returns (timestamp in seconds, absolute; request with timestamp_ms unset), or None to skip.
RowParser = Callable[[Sequence[str]], "tuple[float, TraceRequest] | None"]


def _read_csv(path: Path, fmt: str, *, keep_failed: bool) -> list[TraceRequest]:
    with open(path, encoding="utf-8", newline="") as handle, paused_gc():
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise TraceFormatError(path, "empty file, expected a CSV header", 1)
        columns = {name.strip(): index for index, name in enumerate(header)}
        missing = [name for name in CSV_SIGNATURES[fmt] if name not in columns]
        if missing:
            raise TraceFormatError(path, f"{fmt} trace is missing columns {missing}", 1)
        parse_row = _ROW_PARSER_FACTORIES[fmt](columns, keep_failed)
        stamped: list[tuple[float, TraceRequest]] = []
        for row in reader:
            if not row:
                continue
            try:
                parsed = parse_row(row)
            except (ValueError, IndexError) as error:
                raise TraceFormatError(path, f"bad {fmt} row {row!r}: {error}", reader.line_num) from None
            if parsed is not None:
                stamped.append(parsed)
    if not stamped:
        return []
    origin = min(seconds for seconds, _ in stamped)
    requests = []
    for seconds, request in stamped:
        request.timestamp_ms = (seconds - origin) * 1000.0
        requests.append(request)
    return requests


def _length(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = round(float(text))
    if value < 0:
        raise InputError(f"negative token count {text}")
    return value


def _azure_parser(columns: dict[str, int], keep_failed: bool) -> RowParser:
    time_col, input_col, output_col = (columns[name] for name in CSV_SIGNATURES["azure"])
    parse_datetime = datetime.fromisoformat
    # Seconds are counted from the first row's time, not the epoch, to keep microsecond precision.
    origin: list[datetime] = []

    def parse(row: Sequence[str]) -> tuple[float, TraceRequest]:
        moment = parse_datetime(row[time_col].strip())
        if not origin:
            origin.append(moment)
        seconds = (moment - origin[0]).total_seconds()
        return seconds, TraceRequest(0.0, _length(row[input_col]), _length(row[output_col]))

    return parse


def _burstgpt_parser(columns: dict[str, int], keep_failed: bool) -> RowParser:
    time_col, input_col, output_col = (columns[name] for name in CSV_SIGNATURES["burstgpt"])
    model_col = columns.get("Model")
    log_type_col = columns.get("Log Type")

    def parse(row: Sequence[str]) -> tuple[float, TraceRequest] | None:
        output_length = _length(row[output_col])
        if output_length == 0 and not keep_failed:
            return None
        request = TraceRequest(0.0, _length(row[input_col]), output_length)
        if model_col is not None and row[model_col]:
            request.model = row[model_col]
        if log_type_col is not None and row[log_type_col]:
            # "Conversation log" / "API log" -> "conversation" / "api"
            request.category = row[log_type_col].strip().lower().removesuffix(" log")
        return float(row[time_col]), request

    return parse


def _vidur_parser(columns: dict[str, int], keep_failed: bool) -> RowParser:
    input_col, output_col = (columns[name] for name in CSV_SIGNATURES["vidur"])
    time_col = columns.get("arrived_at")

    def parse(row: Sequence[str]) -> tuple[float, TraceRequest]:
        seconds = float(row[time_col]) if time_col is not None else 0.0
        return seconds, TraceRequest(0.0, _length(row[input_col]), _length(row[output_col]))

    return parse


def _splitwise_parser(columns: dict[str, int], keep_failed: bool) -> RowParser:
    time_col, input_col, output_col = (columns[name] for name in CSV_SIGNATURES["splitwise"])
    application_col = columns.get("application_id")

    def parse(row: Sequence[str]) -> tuple[float, TraceRequest]:
        request = TraceRequest(0.0, _length(row[input_col]), _length(row[output_col]))
        if application_col is not None and row[application_col]:
            request.tenant = row[application_col].strip()
        return float(row[time_col]), request

    return parse


_ROW_PARSER_FACTORIES: dict[str, Callable[[dict[str, int], bool], RowParser]] = {
    "azure": _azure_parser,
    "burstgpt": _burstgpt_parser,
    "vidur": _vidur_parser,
    "splitwise": _splitwise_parser,
}
