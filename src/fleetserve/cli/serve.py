"""`fleetserve serve -c fleet.yaml`: the gateway in front of the fleet a fleet file describes."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager

import click
import uvloop

from fleetserve.config import ConfigError, FleetConfig, load_fleet
from fleetserve.gateway.server import run_gateway
from fleetserve.routing import POLICIES

log = logging.getLogger(__name__)


def launch_engines(config: FleetConfig) -> AbstractAsyncContextManager[None]:
    """HOOK: start the engines the fleet file asks fleetserve to launch (emulated, llama.cpp, ...) and
    stop them on exit. The gateway does not wait for them: it probes every engine and routes to one
    only once it is ready.

    Until launching is wired in here, engines that are not `external` must already be running at the
    ports `FleetConfig.instances()` assigns them (the same as `--no-launch`)."""
    return _expect_running(config)


@contextlib.asynccontextmanager
async def _expect_running(config: FleetConfig) -> AsyncIterator[None]:
    for instance in config.instances():
        if instance.group.kind != "external":
            log.warning(
                "engine %s (%s) is not launched; expecting it at %s",
                instance.engine_id,
                instance.group.kind,
                instance.url,
            )
    yield


@click.command()
@click.option(
    "-c", "--config", "config_path", required=True, type=click.Path(dir_okay=False), help="Fleet file."
)
@click.option("--no-launch", is_flag=True, help="Do not start engines; serve those already running.")
@click.option("--port", type=click.IntRange(0, 65535), help="Gateway port (overrides gateway.port).")
@click.option("--policy", help="Routing policy (overrides router.policy), e.g. least_request.")
def serve(config_path: str, no_launch: bool, port: int | None, policy: str | None) -> None:
    """Start the gateway (and the engines) a fleet file describes."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = load_fleet(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if policy is not None and policy not in POLICIES:
        valid = ", ".join(sorted(POLICIES))
        raise click.ClickException(f"unknown policy {policy!r}; valid policies: {valid}")
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the SIGINT it handled
        uvloop.run(_serve(config, launch=not no_launch, port=port, policy=policy))


async def _serve(config: FleetConfig, *, launch: bool, port: int | None, policy: str | None) -> None:
    engines = launch_engines(config) if launch else contextlib.nullcontext()
    async with engines:
        await run_gateway(config, port=port, policy=policy, on_ready=_announce)


def _announce(url: str) -> None:
    click.echo(f"fleetserve gateway listening on {url}")
    sys.stdout.flush()
