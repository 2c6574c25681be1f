"""How fast can `fleetserve bench` itself go? The load generator's ceiling on one core.

A raw asyncio HTTP/1.1 server runs in a separate process (pinned to another core when there is one) and
answers as fast as it can with canned bytes: `/tiny/...` a one-chunk reply with a Content-Length, and
`/v1/completions` an SSE stream of N chunks (chunked transfer encoding, one write per chunk, as an
engine emits tokens). The load generator (`run_bench`, closed loop, the same code path as the CLI) runs
in this process, pinned to one core. Figures: requests/s with tiny replies and SSE chunks/s, both per
wall-clock second and per CPU-second of the load generator (the latter is robust to a busy machine).

    python benchmarks/loadgen_ceiling.py [--repeats 3] [--chunks 256] [--no-append]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import orjson

from fleetserve.bench.runner import BenchConfig, BenchResult, run_bench, run_sync

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "docs" / "benchmarks.md"


# --- the canned server (runs in the child process) -------------------------------------------------


def _sse(payload: object) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def _chunk_frame(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def _canned_responses(chunks: int) -> tuple[bytes, bytes, bytes, bytes]:
    token = _sse({"id": "c", "object": "text_completion", "choices": [{"index": 0, "text": " tok"}]})
    usage = _sse({"id": "c", "choices": [], "usage": {"prompt_tokens": 8, "completion_tokens": chunks}})
    done = b"data: [DONE]\n\n"
    tiny_usage = _sse({"id": "c", "choices": [], "usage": {"prompt_tokens": 8, "completion_tokens": 1}})
    tiny_body = token + tiny_usage + done
    tiny = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        + f"Content-Length: {len(tiny_body)}\r\n\r\n".encode()
        + tiny_body
    )
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    return tiny, head, _chunk_frame(token), _chunk_frame(usage + done) + b"0\r\n\r\n"


class CannedHTTP(asyncio.Protocol):
    """Keep-alive HTTP/1.1 without pipelining (aiohttp sends one request per connection at a time)."""

    def __init__(self, chunks: int, responses: tuple[bytes, bytes, bytes, bytes]) -> None:
        self.chunks = chunks
        self.tiny, self.head, self.token, self.tail = responses
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.streams: set[asyncio.Future[None]] = set()  # strong references until each stream ends

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end]).lower()
        marker = head.find(b"content-length:")
        length = int(head[marker + 15 : head.find(b"\r\n", marker) % (len(head) + 1)]) if marker >= 0 else 0
        if len(self.buffer) < end + 4 + length:
            return
        del self.buffer[: end + 4 + length]
        assert self.transport is not None
        if head.split(b" ", 2)[1].startswith(b"/tiny"):
            self.transport.write(self.tiny)
        else:
            task = asyncio.ensure_future(self.stream(self.transport))
            self.streams.add(task)
            task.add_done_callback(self.streams.discard)

    async def stream(self, transport: asyncio.Transport) -> None:
        transport.write(self.head)
        for _ in range(self.chunks):
            transport.write(self.token)
            await asyncio.sleep(0)  # one write per event loop turn: tokens leave one at a time
        transport.write(self.tail)


def serve(port: int, chunks: int) -> None:
    responses = _canned_responses(chunks)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: CannedHTTP(chunks, responses), "127.0.0.1", port, backlog=1024
        )
        async with server:
            await server.serve_forever()

    run_sync(main())


# --- the measurement (runs in this process) --------------------------------------------------------


def _pin(cpu: int) -> None:
    if hasattr(os, "sched_setaffinity") and cpu in os.sched_getaffinity(0):
        os.sched_setaffinity(0, {cpu})


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen[bytes], deadline_s: float = 20.0) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("canned server exited")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError("canned server did not start")


def _measure(config: BenchConfig, use_uvloop: bool) -> tuple[BenchResult, float, float]:
    cpu_before, wall_before = time.process_time(), time.perf_counter()
    result = run_sync(run_bench(config), use_uvloop)
    cpu, wall = time.process_time() - cpu_before, time.perf_counter() - wall_before
    if result.summary.failed:
        raise RuntimeError(f"load generator saw failures: {result.summary.failures}")
    return result, wall, cpu


def _machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {model}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--chunks", type=int, default=256, help="SSE chunks per streamed reply")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny-requests", type=int, default=10000)
    parser.add_argument("--stream-requests", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--asyncio", action="store_true", help="load generator on asyncio's loop, not uvloop")
    parser.add_argument("--no-append", action="store_true", help="print only; do not append to docs")
    args = parser.parse_args()
    if args.serve is not None:
        _pin(1)
        serve(args.serve, args.chunks)
        return

    machine = _machine()  # before pinning narrows this process's CPU set
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(port), "--chunks", str(args.chunks)], start_new_session=True
    )
    try:
        _wait_for_port(port, server)
        _pin(0)
        base = f"http://127.0.0.1:{port}"
        tiny = BenchConfig(
            url=f"{base}/tiny",
            model="m",
            workload="input=8,output=1",
            concurrency=args.concurrency,
            num_requests=args.tiny_requests,
        )
        streamed = BenchConfig(
            url=base,
            model="m",
            workload=f"input=8,output={args.chunks}",
            concurrency=args.concurrency,
            num_requests=args.stream_requests,
        )
        warm_up = BenchConfig(
            url=f"{base}/tiny", model="m", workload="input=8,output=1", concurrency=8, num_requests=200
        )
        _measure(warm_up, not args.asyncio)  # imports, first connections
        figures: dict[str, list[float]] = {name: [] for name in ("rps", "rps_cpu", "cps", "cps_cpu")}
        for _ in range(args.repeats):
            result, wall, cpu = _measure(tiny, not args.asyncio)
            figures["rps"].append(result.summary.completed / wall)
            figures["rps_cpu"].append(result.summary.completed / cpu)
            result, wall, cpu = _measure(streamed, not args.asyncio)
            chunks = sum(len(record.itls) + 1 for record in result.records)
            figures["cps"].append(chunks / wall)
            figures["cps_cpu"].append(chunks / cpu)
    finally:
        server.kill()
        server.wait(timeout=10)

    median = {name: statistics.median(values) for name, values in figures.items()}
    loop = "asyncio's own event loop" if args.asyncio else "uvloop"
    command = "python benchmarks/loadgen_ceiling.py " + " ".join(sys.argv[1:])
    lines = [
        f"- tiny replies, closed loop at {args.concurrency}: **{median['rps']:,.0f} requests/s** "
        f"({median['rps_cpu']:,.0f} per load-generator CPU-second)",
        f"- SSE streams of {args.chunks} chunks, closed loop at {args.concurrency}: "
        f"**{median['cps']:,.0f} chunks/s** ({median['cps_cpu']:,.0f} per load-generator CPU-second)",
    ]
    print("\n".join(lines))
    if args.no_append:
        return
    date = subprocess.run(["date", "-u"], capture_output=True, text=True, check=False).stdout.strip()
    section = [
        "",
        "## Load generator ceiling (`fleetserve bench` on one core)",
        "",
        f"- date: {date or datetime.datetime.now(datetime.UTC).isoformat()}",
        f"- machine: {machine}; load average {os.getloadavg()[0]:.1f} when it finished (other jobs "
        "depress the wall-clock figures; the per-CPU-second ones are the ceiling on an idle core)",
        f"- command: `{command.strip()}`",
        f"- medians of {args.repeats} runs; load generator pinned to CPU 0, canned raw-asyncio server "
        f"(separate process, uvloop) on CPU 1; load generator on {loop}",
        *lines,
        "",
    ]
    REPORT.parent.mkdir(exist_ok=True)
    with REPORT.open("a") as handle:
        if handle.tell() == 0:
            handle.write("# Benchmarks\n\nEach section is appended by the script it names.\n")
        handle.write("\n".join(section))
    print(f"appended to {REPORT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
