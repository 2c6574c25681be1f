"""`fleetserve bench` end to end: the real console script against a real (fake) OpenAI server process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest

from fleetserve.bench.metrics import SLO
from fleetserve.bench.runner import BenchConfig, run_bench

SERVER = Path(__file__).with_name("fake_openai_server.py")
FLEETSERVE = Path(sys.executable).with_name("fleetserve")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_healthy(url: str, process: subprocess.Popen[bytes], deadline_s: float = 30.0) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"fake server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.05)  # polling interval, not synchronisation: the loop checks the condition
    raise TimeoutError(f"{url} did not become healthy")


@pytest.fixture
def fake_server() -> Iterator[Callable[..., str]]:
    processes: list[subprocess.Popen[bytes]] = []

    def start(*knobs: str) -> str:
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, str(SERVER), "--port", str(port), *knobs], start_new_session=True
        )
        processes.append(process)
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(url, process)
        return url

    yield start
    for process in processes:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def bench(*args: str, expect_ok: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(FLEETSERVE), "bench", *args], capture_output=True, text=True, timeout=120, check=False
    )
    if expect_ok:
        assert result.returncode == 0, result.stderr
    return result


def failures_expected(sent: int, **periods: int) -> dict[str, int]:
    """The fake server's deterministic failure pattern: the first matching knob wins."""
    counts: dict[str, int] = {}
    for n in range(1, sent + 1):
        for kind, period in periods.items():
            if n % period == 0:
                counts[kind] = counts.get(kind, 0) + 1
                break
    return counts


def test_injected_failures_are_counted_and_classified(fake_server, tmp_path: Path) -> None:
    url = fake_server("--fail-every", "5", "--stream-error-every", "7", "--truncate-every", "11")
    out = tmp_path / "closed.json"
    bench(
        "--url",
        url,
        "--model",
        "fake",
        "--workload",
        "input=32,output=8",
        "--concurrency",
        "4",
        "--num-requests",
        "60",
        "--json",
        str(out),
        "--quiet",
    )
    report = json.loads(out.read_text())
    summary = report["summary"]
    assert summary["sent"] == 60 == len(report["requests"])
    assert summary["completed"] + summary["failed"] == 60
    expected = failures_expected(60, http_503=5, stream_error=7, incomplete_stream=11)
    assert summary["failures"] == expected
    assert summary["completed"] == 60 - sum(expected.values())
    assert summary["total_output_tokens"] == 8 * summary["completed"]
    assert summary["ttft_ms"]["count"] == summary["completed"]
    assert report["config"]["arrival_mode"] == "closed_loop"
    statuses = {r["status"] for r in report["requests"] if r["failure"] == "http_503"}
    assert statuses == {503}


def test_trace_replay_on_the_chat_endpoint_with_slos(fake_server, tmp_path: Path) -> None:
    url = fake_server("--chunk-delay-ms", "1")
    trace = tmp_path / "trace.jsonl"
    lines = [
        {"timestamp": 200 * i, "input_length": 40 + i, "output_length": 3 + i % 4, "hash_ids": [0, 1 + i]}
        for i in range(12)
    ]
    trace.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "trace.json"
    # Requests every 200 ms of trace time, replayed 4x faster: every 50 ms. A 0.53 s window takes the
    # requests at offsets 0, 0.05, ..., 0.50 s (11 of them) and leaves out the one at 0.55 s.
    bench(
        "--url",
        url,
        "--model",
        "fake",
        "--trace",
        str(trace),
        "--rate-scale",
        "4",
        "--duration",
        "0.53",
        "--endpoint",
        "chat",
        "--slo-ttft-ms",
        "10000",
        "--slo-tpot-ms",
        "10000",
        "--json",
        str(out),
        "--quiet",
    )
    report = json.loads(out.read_text())
    summary = report["summary"]
    assert summary["sent"] == 11
    assert summary["failed"] == 0
    assert summary["goodput"] == pytest.approx(summary["request_throughput"])
    assert [r["requested_output_tokens"] for r in report["requests"]] == [3 + i % 4 for i in range(11)]
    assert [r["output_tokens"] for r in report["requests"]] == [3 + i % 4 for i in range(11)]
    scheduled = [r["scheduled_at"] for r in report["requests"]]
    assert scheduled == pytest.approx([0.05 * i for i in range(11)])
    assert all(r["sent_at"] >= r["scheduled_at"] - 0.002 for r in report["requests"])


def test_unreachable_endpoint_fails_every_request_as_connect_error(tmp_path: Path) -> None:
    out = tmp_path / "down.json"
    result = bench(
        "--url",
        f"http://127.0.0.1:{free_port()}",
        "--model",
        "m",
        "--workload",
        "input=4,output=2",
        "--rate",
        "inf",
        "--num-requests",
        "5",
        "--json",
        str(out),
        "--quiet",
        expect_ok=False,
    )
    assert result.returncode != 0
    assert "no request completed" in result.stderr
    summary = json.loads(out.read_text())["summary"]
    assert summary["sent"] == 5 and summary["failures"] == {"connect_error": 5}


def test_rate_limited_requests_are_http_429(fake_server, tmp_path: Path) -> None:
    url = fake_server("--fail-every", "2", "--fail-status", "429")
    out = tmp_path / "limited.json"
    bench(
        "--url",
        url,
        "--model",
        "fake",
        "--workload",
        "input=8,output=2",
        "--rate",
        "200",
        "--num-requests",
        "10",
        "--json",
        str(out),
        "--quiet",
    )
    summary = json.loads(out.read_text())["summary"]
    assert summary["failures"] == {"http_429": 5}
    assert summary["completed"] == 5


def test_slow_streams_hit_the_request_timeout(fake_server, tmp_path: Path) -> None:
    url = fake_server("--chunk-delay-ms", "100")
    out = tmp_path / "slow.json"
    bench(
        "--url",
        url,
        "--model",
        "fake",
        "--workload",
        "input=8,output=50",
        "--concurrency",
        "3",
        "--num-requests",
        "3",
        "--timeout",
        "0.3",
        "--json",
        str(out),
        "--quiet",
        expect_ok=False,
    )
    summary = json.loads(out.read_text())["summary"]
    assert summary["failures"] == {"timeout": 3}


def test_ctrl_c_stops_sending_and_still_writes_the_report(fake_server, tmp_path: Path) -> None:
    url = fake_server("--chunk-delay-ms", "20")
    out = tmp_path / "interrupted.json"
    process = subprocess.Popen(
        [
            str(FLEETSERVE),
            "bench",
            "--url",
            url,
            "--model",
            "fake",
            "--workload",
            "input=8,output=10",
            "--rate",
            "40",
            "--duration",
            "120",
            "--json",
            str(out),
            "--quiet",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while received(url) < 5:
            assert time.monotonic() < deadline, "the benchmark never got going"
            time.sleep(0.05)  # polling interval
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, stderr
    report = json.loads(out.read_text())
    summary = report["summary"]
    assert report["interrupted"] is True
    assert summary["sent"] >= 5
    assert summary["completed"] + summary["failed"] == summary["sent"] == len(report["requests"])
    assert summary["failed"] == 0
    # It stopped sending at the interrupt: far fewer than the 120 s x 40 req/s it was asked for.
    assert summary["sent"] <= received(url) < 4800


def received(url: str) -> int:
    with urllib.request.urlopen(f"{url}/stats", timeout=5) as response:
        return json.loads(response.read())["requests"]


def test_compare_prints_runs_side_by_side_and_plots(fake_server, tmp_path: Path) -> None:
    url = fake_server()
    reports = []
    for concurrency in ("1", "4"):
        out = tmp_path / f"c{concurrency}.json"
        bench(
            "--url",
            url,
            "--model",
            "fake",
            "--workload",
            "input=16,output=4",
            "--concurrency",
            concurrency,
            "--num-requests",
            "12",
            "--json",
            str(out),
            "--quiet",
        )
        reports.append(str(out))
    plot = tmp_path / "cmp.png"
    result = bench("compare", *reports, "--plot", str(plot))
    assert "c1" in result.stdout and "c4" in result.stdout and "TTFT p99 (ms)" in result.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_usage_errors_are_reported(tmp_path: Path) -> None:
    result = bench(
        "--url",
        "http://127.0.0.1:1",
        "--model",
        "m",
        "--workload",
        "input=4,output=2",
        "--num-requests",
        "3",
        expect_ok=False,
    )
    assert result.returncode == 2
    assert "rate or a concurrency" in result.stderr


def test_run_bench_is_importable_and_async(fake_server) -> None:
    url = fake_server()
    config = BenchConfig(
        url=url,
        model="fake",
        workload="input=16,output=5,prefix=16",
        concurrency=3,
        num_requests=9,
        slo=SLO(ttft_ms=60_000),
    )
    result = asyncio.run(run_bench(config))
    assert result.summary.completed == 9
    assert result.summary.goodput is not None and result.summary.goodput > 0
    assert all(record.output_tokens == 5 and len(record.itls) == 4 for record in result.records)


def test_fake_server_speaks_openai_streaming(fake_server) -> None:
    """The official client accepts the fake server's stream, so the benchmark is tested against a
    faithful shape."""
    url = fake_server()
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    stream = client.chat.completions.create(
        model="fake",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == " tok tok tok"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
