"""Request traces: the `TraceRequest` record, readers for public trace formats, seeded generators,
transforms, and prompts whose prefixes are shared exactly as a trace's hash ids say."""

from fleetserve.workload.generators import WorkloadSpec, generate, parse_length_spec
from fleetserve.workload.prompts import prompt_text, prompt_token_ids
from fleetserve.workload.readers import FORMATS, detect_format, read_trace
from fleetserve.workload.stats import summarize
from fleetserve.workload.trace import TraceFormatError, TraceRequest, read_jsonl, write_jsonl
from fleetserve.workload.transform import TransformSpec, apply_transforms

__all__ = [
    "FORMATS",
    "TraceFormatError",
    "TraceRequest",
    "TransformSpec",
    "WorkloadSpec",
    "apply_transforms",
    "detect_format",
    "generate",
    "parse_length_spec",
    "prompt_text",
    "prompt_token_ids",
    "read_jsonl",
    "read_trace",
    "summarize",
    "write_jsonl",
]
