"""What the benchmark scripts share: the machine's CPU model for their reports, where the shared traces
are, free ports, and starting, probing and stopping the servers they measure. Scripts run as
`python benchmarks/NAME.py`, so this directory is on their import path."""

from __future__ import annotations

import datetime
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


ROOT = Path(__file__).resolve().parent.parent
# the project's shared data sits beside the repository (../shared/data); FLEETSERVE_SHARED_DATA moves it
SHARED_DATA = Path(os.environ.get("FLEETSERVE_SHARED_DATA", ROOT.parent / "shared" / "data"))


def record(section: str) -> None:
    """Append a benchmark's section to docs/benchmarks.md, after a blank line."""
    with (ROOT / "docs" / "benchmarks.md").open("a") as docs:
        docs.write("\n" + section)


def shared_trace(name: str) -> Path:
    """A trace of the shared data, e.g. "mooncake_conversation.jsonl"."""
    return SHARED_DATA / "traces" / name


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports nothing listens on, held open together while the kernel picks them."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind((host, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port_block(count: int, host: str = "127.0.0.1") -> int:
    """The first of `count` consecutive free ports (for commands that take a base port)."""
    for _ in range(100):
        base = free_port()
        if base + count <= 65535 and all(_port_is_free(port, host) for port in range(base, base + count)):
            return base
    raise RuntimeError(f"found no {count} consecutive free ports")


def _port_is_free(port: int, host: str) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def answers(url: str) -> bool:
    """Whether GET `url` answers 200 within 2 s."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def stop_process_group(process: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM to the process's group (started with `start_new_session=True`; `fleetserve serve` stops its
    engines on it), SIGKILL if it lingers past `timeout`."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def start_redis(port: int) -> tuple[subprocess.Popen, str]:
    """A real `redis-server` (Debian's) on a loopback port, keeping nothing on disk, and its URL once it
    answers PING."""
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 20
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as connection:
                connection.sendall(b"PING\r\n")
                if connection.recv(64).startswith(b"+PONG"):
                    return process, f"redis://127.0.0.1:{port}/0"
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"redis-server did not start on port {port}")
        time.sleep(0.05)


def section_head(title: str, script: str) -> list[str]:
    """A benchmark section's first lines: its title, the date, the machine and the command that ran."""
    command = f"python benchmarks/{script} " + " ".join(sys.argv[1:])
    return [
        f"## {title}",
        "",
        f"- date: {datetime.datetime.now(datetime.UTC):%a %b %d %H:%M:%S UTC %Y}",
        f"- machine: {os.cpu_count()} cores (nproc), {cpu_model()}, Python {platform.python_version()}, "
        "shared with other jobs",
        f"- command: `{command.strip()}`",
    ]


def publish(section: str, write: bool) -> None:
    """Print a benchmark's section and, when `write`, append it to docs/benchmarks.md."""
    print(section)
    if write:
        record(section)
