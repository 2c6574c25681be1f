"""`--workload SPEC`: synthetic requests for a benchmark without a trace.

SPEC is comma-separated `key=value`:
  input=LEN       prompt length in tokens (required)
  output=LEN      output length in tokens (required; sent as max_tokens with ignore_eos)
  prefix=N        the first N prompt tokens are the same for every request (default 0), to exercise
                  prefix caching; rounded down to whole blocks of 16 tokens
LEN is a length spec of `fleetserve.workload.generators`: `N` (short for `fixed:N`), `uniform:LO:HI`,
`zipf:MEAN[:THETA]` (heavy-tailed with that mean) or `empirical:TRACE` (resampled from a trace's lengths).
Example: `input=zipf:300,output=zipf:200,prefix=256`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from fleetserve.errors import InputError
from fleetserve.workload.generators import LengthDistribution, parse_length_spec
from fleetserve.workload.trace import TraceRequest

PREFIX_BLOCK_TOKENS = 16
# Lengths are drawn this many at a time: one numpy call per batch, not per request.
DRAW_BATCH = 1024


class WorkloadSpecError(InputError):
    pass


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    input: LengthDistribution
    output: LengthDistribution
    prefix_tokens: int

    def requests(self, seed: int = 0) -> Iterator[TraceRequest]:
        """Endless requests (timestamp 0: the arrival schedule decides when they go). They share their
        first `prefix_tokens` through equal leading hash ids; `prompt_text` makes the rest of each prompt
        unique to the request's index."""
        input_rng, output_rng = (
            np.random.default_rng(child) for child in np.random.SeedSequence(seed).spawn(2)
        )
        shared = tuple(range(self.prefix_tokens // PREFIX_BLOCK_TOKENS)) or None
        while True:
            inputs = self.input.sample(input_rng, DRAW_BATCH)
            outputs = self.output.sample(output_rng, DRAW_BATCH)
            for input_length, output_length in zip(inputs.tolist(), outputs.tolist(), strict=True):
                yield TraceRequest(
                    timestamp_ms=0.0,
                    input_length=input_length,
                    output_length=output_length,
                    hash_ids=shared,
                    hash_block_size=PREFIX_BLOCK_TOKENS,
                )


def parse_workload(spec: str) -> WorkloadSpec:
    fields: dict[str, str] = {}
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        key, sep, value = (text.strip() for text in item.partition("="))
        if not sep or key not in ("input", "output", "prefix"):
            raise WorkloadSpecError(f"bad workload item {item!r}: expected input=, output= or prefix=")
        fields[key] = value
    missing = [key for key in ("input", "output") if key not in fields]
    if missing:
        raise WorkloadSpecError(f"workload spec {spec!r} lacks {' and '.join(missing)}")
    try:
        prefix = int(fields.get("prefix", "0"))
    except ValueError:
        raise WorkloadSpecError(f"prefix must be an integer, got {fields['prefix']!r}") from None
    if prefix < 0:
        raise WorkloadSpecError(f"prefix must not be negative, got {prefix}")
    return WorkloadSpec(_length(fields["input"], "input"), _length(fields["output"], "output"), prefix)


def _length(text: str, side: str) -> LengthDistribution:
    spec = f"fixed:{text}" if text.isdigit() else text
    try:
        return parse_length_spec(spec, side=side)
    except (InputError, OSError) as error:
        raise WorkloadSpecError(f"{side}: {error}") from None
