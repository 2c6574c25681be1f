import os
from pathlib import Path

import pytest

from fleetserve.workload.readers import detect_format, read_trace
from fleetserve.workload.trace import TraceFormatError, TraceRequest

SHARED_DATA = Path(
    os.environ.get("FLEETSERVE_SHARED_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data")
)
TRACES = SHARED_DATA / "traces"
needs_shared_traces = pytest.mark.skipif(
    not TRACES.is_dir(), reason=f"shared traces not found at {TRACES} (set FLEETSERVE_SHARED_DATA)"
)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_azure_csv_gives_milliseconds_from_the_first_request(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "azure.csv",
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:50.9951690,396,109\n"
        "2023-11-16 18:16:46.6805900,91,16\n",
    )
    assert detect_format(path) == "azure"
    requests = read_trace(path)
    assert [(r.input_length, r.output_length) for r in requests] == [(374, 44), (396, 109), (91, 16)]
    assert [r.timestamp_ms for r in requests] == pytest.approx([0.0, 4314.579, 60000.0])
    assert all(r.hash_ids is None for r in requests)


def test_burstgpt_skips_failed_requests_unless_asked(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "burst.csv",
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "5,ChatGPT,472,18,490,Conversation log\n"
        "45,GPT-4,1087,0,1087,API log\n"
        "46.5,ChatGPT,200,30,230,API log\n",
    )
    assert detect_format(path) == "burstgpt"
    kept = read_trace(path)
    assert kept == [
        TraceRequest(0.0, 472, 18, model="ChatGPT", category="conversation"),
        TraceRequest(41500.0, 200, 30, model="ChatGPT", category="api"),
    ]
    with_failed = read_trace(path, keep_failed=True)
    assert [r.output_length for r in with_failed] == [18, 0, 30]
    assert with_failed[1].model == "GPT-4"


def test_vidur_csv_with_and_without_arrival_times(tmp_path: Path) -> None:
    timed = write(
        tmp_path,
        "vidur.csv",
        "arrived_at,num_prefill_tokens,num_decode_tokens\n0.0,374,44\n4.314579,396,109\n",
    )
    assert detect_format(timed) == "vidur"
    assert read_trace(timed) == [TraceRequest(0.0, 374, 44), TraceRequest(pytest.approx(4314.579), 396, 109)]
    lengths_only = write(
        tmp_path,
        "lengths.csv",
        "num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio\n3772,54,3826,69.8\n2015,156,2171,12.9\n",
    )
    assert [(r.timestamp_ms, r.input_length) for r in read_trace(lengths_only)] == [(0.0, 3772), (0.0, 2015)]


def test_splitwise_sim_csv_maps_application_to_tenant(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "splitwise.csv",
        "request_id,request_type,application_id,arrival_timestamp,batch_size,prompt_size,token_size\n"
        "0,2,0,1,1,4096,32\n1,2,3,3.5,1,2048,8\n",
    )
    assert detect_format(path) == "splitwise"
    assert read_trace(path) == [
        TraceRequest(0.0, 4096, 32, tenant="0"),
        TraceRequest(2500.0, 2048, 8, tenant="3"),
    ]


def test_jsonl_is_detected_by_content_without_an_extension(tmp_path: Path) -> None:
    path = write(tmp_path, "trace", '{"timestamp": 0, "input_length": 3, "output_length": 1}\n')
    assert detect_format(path) == "jsonl"
    assert read_trace(path) == [TraceRequest(0.0, 3, 1)]


def test_unknown_header_lists_the_formats(tmp_path: Path) -> None:
    path = write(tmp_path, "odd.csv", "when,prompt,answer\n1,2,3\n")
    with pytest.raises(TraceFormatError, match=r"odd\.csv:1: cannot tell the trace format.*azure: TIMESTAMP"):
        read_trace(path)


def test_bad_csv_row_names_file_and_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "azure.csv",
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.68,374,44\n"
        "2023-11-16 18:15:47,lots,44\n",
    )
    with pytest.raises(TraceFormatError, match=r"azure\.csv:3: bad azure row") as caught:
        read_trace(path)
    assert caught.value.line == 3


def test_forced_format_with_missing_columns_and_missing_file(tmp_path: Path) -> None:
    path = write(tmp_path, "azure.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n")
    with pytest.raises(TraceFormatError, match="missing columns"):
        read_trace(path, "burstgpt")
    assert read_trace(path) == []
    with pytest.raises(TraceFormatError, match="no such file"):
        read_trace(tmp_path / "absent.csv")
    with pytest.raises(TraceFormatError, match="unknown trace format"):
        read_trace(path, "parquet")


@needs_shared_traces
@pytest.mark.parametrize(
    ("name", "fmt", "rows"),
    [
        ("azure_llm_2023_conv.csv", "azure", 19366),
        ("azure_llm_2023_code.csv", "azure", 8819),
        ("mooncake_conversation.jsonl", "jsonl", 12031),
        ("mooncake_synthetic.jsonl", "jsonl", 3993),
    ],
)
def test_real_shared_traces_read_every_row(name: str, fmt: str, rows: int) -> None:
    path = TRACES / name
    # Counted independently of the readers: non-blank lines, less the CSV header.
    assert sum(1 for line in path.open("rb") if line.strip()) == rows + (1 if fmt == "azure" else 0)
    assert detect_format(path) == fmt
    requests = read_trace(path)
    assert len(requests) == rows
    assert requests[0].timestamp_ms == 0.0
    assert all(r.input_length > 0 for r in requests)
    if fmt == "jsonl":
        assert all(r.hash_ids and len(r.hash_ids) == -(-r.input_length // 512) for r in requests)
