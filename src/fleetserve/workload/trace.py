"""The request record every workload tool speaks, and fleetserve's own JSONL trace format.

One JSON object per line. `timestamp` is in milliseconds from the start of the trace, `hash_ids` holds one
id per `hash_block_size`-token block of the prompt (equal ids mean an equal prefix up to and including that
block). This is a superset of the Mooncake trace format, so Mooncake files are read as they are.
"""

from __future__ import annotations

import gc
import io
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from fleetserve.errors import InputError

DEFAULT_BLOCK_SIZE = 512

# Optional string labels: written only when set, read back as given.
LABEL_FIELDS = ("model", "adapter", "tenant", "session", "category")


class TraceFormatError(InputError):
    """A trace file could not be read; the message names the file and, where known, the line."""

    def __init__(self, path: str | Path, message: str, line: int | None = None) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")
        self.path = str(path)
        self.line = line


@dataclass(slots=True)
class TraceRequest:
    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...] | None = None
    hash_block_size: int = DEFAULT_BLOCK_SIZE
    model: str | None = None
    adapter: str | None = None
    tenant: str | None = None
    session: str | None = None
    category: str | None = None
    priority: int = 0

    def to_json_dict(self) -> dict[str, Any]:
        """The JSONL object for this request, leaving out fields that hold their default."""
        record: dict[str, Any] = {
            "timestamp": _compact_number(self.timestamp_ms),
            "input_length": self.input_length,
            "output_length": self.output_length,
        }
        if self.hash_ids is not None:
            record["hash_ids"] = self.hash_ids
            if self.hash_block_size != DEFAULT_BLOCK_SIZE:
                record["hash_block_size"] = self.hash_block_size
        for name in LABEL_FIELDS:
            value = getattr(self, name)
            if value is not None:
                record[name] = value
        if self.priority:
            record["priority"] = self.priority
        return record


def _compact_number(value: float) -> float | int:
    # Integral timestamps stay integers so Mooncake-derived files round-trip byte for byte.
    return int(value) if float(value).is_integer() else value


def request_from_json_dict(record: dict[str, Any]) -> TraceRequest:
    """Build a request from one decoded JSONL object; raises KeyError/TypeError/ValueError when malformed."""
    hash_ids = record.get("hash_ids")
    request = TraceRequest(
        float(record["timestamp"]),
        int(record["input_length"]),
        int(record["output_length"]),
        tuple(hash_ids) if hash_ids is not None else None,
    )
    # Most lines (all of Mooncake's) hold only these keys; look the optional ones up only when present.
    if len(record) > 3 + (hash_ids is not None):
        request.hash_block_size = int(record.get("hash_block_size", DEFAULT_BLOCK_SIZE))
        request.model = _optional_str(record.get("model"))
        request.adapter = _optional_str(record.get("adapter"))
        request.tenant = _optional_str(record.get("tenant"))
        request.session = _optional_str(record.get("session"))
        request.category = _optional_str(record.get("category"))
        request.priority = int(record.get("priority", 0))
    if request.input_length < 0 or request.output_length < 0:
        raise InputError("lengths must be >= 0")
    if request.hash_block_size <= 0:
        raise InputError("hash_block_size must be > 0")
    return request


def _optional_str(value: Any) -> str | None:
    # Other tools write ids (tenant, session, ...) as numbers; the record keeps every label a string.
    return None if value is None else str(value)


@contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while building many small acyclic objects: its passes over the
    growing list of requests would otherwise take about a third of the time, and there is nothing to free."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def read_jsonl(path: str | Path) -> list[TraceRequest]:
    """Read a fleetserve (or Mooncake) JSONL trace. Blank lines are skipped."""
    requests: list[TraceRequest] = []
    loads = orjson.loads
    with open(path, "rb") as handle, paused_gc():
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = loads(line)
            except orjson.JSONDecodeError as error:
                raise TraceFormatError(path, f"not valid JSON ({error})", line_number) from None
            if not isinstance(record, dict):
                raise TraceFormatError(path, "expected a JSON object per line", line_number)
            try:
                requests.append(request_from_json_dict(record))
            except KeyError as error:
                raise TraceFormatError(path, f"missing field {error.args[0]!r}", line_number) from None
            except (TypeError, ValueError) as error:
                raise TraceFormatError(path, f"bad value: {error}", line_number) from None
    return requests


def iter_jsonl_lines(requests: Iterable[TraceRequest]) -> Iterator[bytes]:
    dumps = orjson.dumps
    for request in requests:
        yield dumps(request.to_json_dict()) + b"\n"


def write_jsonl(requests: Iterable[TraceRequest], path: str | Path) -> int:
    """Write requests as JSONL to `path` ("-" is stdout) and return how many were written."""
    if str(path) == "-":
        return _write_lines(requests, sys.stdout.buffer)
    with open(path, "wb") as handle:
        return _write_lines(requests, handle)


def _write_lines(requests: Iterable[TraceRequest], handle: io.BufferedIOBase | Any) -> int:
    count = 0
    batch: list[bytes] = []
    for line in iter_jsonl_lines(requests):
        batch.append(line)
        count += 1
        if len(batch) >= 4096:
            handle.write(b"".join(batch))
            batch.clear()
    handle.write(b"".join(batch))
    handle.flush()
    return count
