"""Running the gateway (and its admin API) under uvicorn with uvloop and httptools."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator

import uvicorn
import uvloop

from fleetserve.config import FleetConfig, GatewayConfig
from fleetserve.gateway.admin import admin_app
from fleetserve.gateway.app import Gateway
from fleetserve.gateway.connections import ConnectionLimits, guarded_protocol

log = logging.getLogger(__name__)


class _QuietServer(uvicorn.Server):
    """A second server in the same process leaves signal handling to the first."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def run_gateway(
    config: FleetConfig,
    *,
    port: int | None = None,
    policy: str | None = None,
    on_ready: Callable[[str], None] | None = None,
    gateway: Gateway | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM (or until `stop` is set). `port` and `policy` override the fleet file;
    `on_ready` receives the gateway's base URL once it listens (useful with port 0)."""
    settings = config.gateway
    gateway = gateway or Gateway(config, policy=policy)
    main = uvicorn.Server(
        _uvicorn_config(gateway, settings, settings.host, settings.port if port is None else port, "on")
    )
    admin = None
    if settings.admin_port is not None:
        if settings.admin_secret is None:
            log.warning(
                "the admin API on %s:%s has no token: any local process can add or remove engines; set"
                " gateway.admin_token_file",
                settings.admin_host,
                settings.admin_port,
            )
        admin = _QuietServer(
            _uvicorn_config(
                admin_app(gateway, settings.admin_secret),
                settings,
                settings.admin_host,
                settings.admin_port,
                "off",
            )
        )
    serving = asyncio.create_task(main.serve())
    admin_serving = asyncio.create_task(admin.serve()) if admin else None
    try:
        while not main.started and not serving.done():
            await asyncio.sleep(0.01)
        if main.started and on_ready is not None:
            host, bound_port = main.servers[0].sockets[0].getsockname()[:2]
            on_ready(f"http://{host}:{bound_port}")
        if stop is not None:
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            main.should_exit = True
        await serving
    finally:
        if admin is not None and admin_serving is not None:
            admin.should_exit = True
            await admin_serving


def serve_gateway(
    config: FleetConfig,
    *,
    port: int | None = None,
    policy: str | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Blocking entry point: `run_gateway` on a uvloop event loop."""
    uvloop.run(run_gateway(config, port=port, policy=policy, on_ready=on_ready))


def _uvicorn_config(
    app: object, settings: GatewayConfig, host: str, port: int, lifespan: str
) -> uvicorn.Config:
    return uvicorn.Config(
        app,  # type: ignore[arg-type]
        host=host,
        port=port,
        loop="none",  # the caller's loop (uvloop under serve_gateway and the CLI)
        http=guarded_protocol(ConnectionLimits.of(settings)),
        timeout_keep_alive=settings.idle_timeout_s,  # type: ignore[arg-type]
        lifespan=lifespan,  # type: ignore[arg-type]
        log_level="warning",
        access_log=False,
        proxy_headers=False,  # clients reach the gateway directly; X-Forwarded-* rewriting costs per request
        server_header=False,
    )
