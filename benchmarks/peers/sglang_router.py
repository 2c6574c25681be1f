"""SGLang's router (`sglang-router launch`, Rust) in front of a list of engines."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from peers import SGLANG_ROUTER
from peers.process import ReadyCheck, ServerSpec, all_of, completion_ok, http_ok

SGLangPolicy = Literal["cache_aware", "round_robin", "random", "power_of_two"]


def sglang_router(
    worker_urls: Sequence[str], policy: SGLangPolicy, port: int, host: str = "127.0.0.1"
) -> ServerSpec:
    argv = [
        str(SGLANG_ROUTER.binary),
        "launch",
        "--worker-urls",
        *worker_urls,
        "--policy",
        policy,
        "--host",
        host,
        "--port",
        str(port),
        "--log-level",
        "warn",
        # Its default 60 s health interval would never notice a change during a run; 1 s matches ours.
        "--health-check-interval-secs",
        "1",
    ]
    return ServerSpec(f"sglang-router {policy}", argv, f"http://{host}:{port}")


def sglang_ready(model: str) -> ReadyCheck:
    return all_of(http_ok("/health"), completion_ok(model))
