from pathlib import Path

import orjson
import pytest

from fleetserve.workload.trace import TraceFormatError, TraceRequest, read_jsonl, write_jsonl


def test_jsonl_round_trip_keeps_every_field(tmp_path: Path) -> None:
    requests = [
        TraceRequest(0.0, 1000, 20, hash_ids=(0, 1), model="llama", adapter="lora-3", tenant="acme"),
        TraceRequest(
            12.5, 7, 3, hash_ids=(5,), hash_block_size=16, session="s1", category="chat", priority=2
        ),
        TraceRequest(40.0, 300, 1),
    ]
    path = tmp_path / "trace.jsonl"
    assert write_jsonl(requests, path) == 3
    assert read_jsonl(path) == requests


def test_written_lines_leave_out_defaults_and_keep_mooncake_names(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    write_jsonl([TraceRequest(1000.0, 600, 10, hash_ids=(0, 1))], path)
    assert orjson.loads(path.read_bytes()) == {
        "timestamp": 1000,
        "input_length": 600,
        "output_length": 10,
        "hash_ids": [0, 1],
    }


def test_mooncake_lines_are_read_as_they_are(tmp_path: Path) -> None:
    path = tmp_path / "mooncake.jsonl"
    path.write_text(
        '{"timestamp": 0, "input_length": 6758, "output_length": 500, "hash_ids": [0, 1, 2]}\n'
        "\n"
        '{"timestamp": 27482, "input_length": 100, "output_length": 5, "hash_ids": [0]}\n'
    )
    first, second = read_jsonl(path)
    assert first == TraceRequest(0.0, 6758, 500, hash_ids=(0, 1, 2))
    assert second.timestamp_ms == 27482.0 and second.hash_block_size == 512


def test_numeric_labels_become_strings(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"timestamp": 0, "input_length": 1, "output_length": 1, "tenant": 7, "session": 3}\n')
    (request,) = read_jsonl(path)
    assert (request.tenant, request.session) == ("7", "3")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"timestamp": 0, "output_length": 1}', "missing field 'input_length'"),
        ('{"timestamp": 0, "input_length": -4, "output_length": 1}', "lengths must be >= 0"),
        ('{"timestamp": "soon", "input_length": 1, "output_length": 1}', "bad value"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_bad_lines_name_the_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"timestamp": 0, "input_length": 1, "output_length": 1}\n' + line + "\n")
    with pytest.raises(TraceFormatError, match=message) as caught:
        read_jsonl(path)
    assert caught.value.line == 2
    assert str(caught.value).startswith(f"{path}:2: ")
