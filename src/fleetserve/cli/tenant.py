"""`fleetserve tenant`: make API keys for the fleet file's `tenants:` without ever storing one."""

from __future__ import annotations

import secrets
import sys

import click

from fleetserve.tenants import key_digest

KEY_PREFIX = "sk-fs-"


@click.group()
def tenant() -> None:
    """API keys for tenants. The fleet file holds only each key's SHA-256 digest."""


@tenant.command()
@click.option("--name", default="team-a", show_default=True, help="The tenant the key belongs to.")
@click.option(
    "--redis",
    "redis_url",
    metavar="URL",
    help="Store the key's digest in this Redis (hash PREFIX:keys) instead of printing a fleet-file"
    " entry; every gateway replica with the same `redis:` picks it up within its sync interval. The"
    " tenant must be listed in the fleet file.",
)
@click.option("--prefix", default="fleetserve", show_default=True, help="The fleet file's redis.key_prefix.")
def key(name: str, redis_url: str | None, prefix: str) -> None:
    """Make a new random API key and print it once, with the `tenants:` entry that holds its digest
    (or, with --redis, store the digest in Redis).

    \b
    Examples:
      fleetserve tenant key --name team-a
      fleetserve tenant key --name team-a --redis redis://127.0.0.1:6379/0
    """
    new_key = KEY_PREFIX + secrets.token_urlsafe(32)
    digest = key_digest(new_key)
    click.echo(f"key (give it to the tenant; it is not stored anywhere): {new_key}")
    if redis_url is None:
        click.echo("fleet file entry:")
        click.echo(f"  - {{name: {name}, key_sha256: [{digest}]}}")
        return
    import redis

    try:
        redis.Redis.from_url(redis_url, socket_timeout=5).hset(f"{prefix}:keys", digest, name)
    except (redis.RedisError, OSError) as exc:
        raise click.ClickException(f"cannot store the key in Redis: {type(exc).__name__}") from None
    click.echo(f"its digest is stored in {prefix}:keys for tenant {name}; revoke it with")
    click.echo(f"  redis-cli HDEL {prefix}:keys {digest}")


@tenant.command()
def digest() -> None:
    """Print the SHA-256 digest of a key read from standard input (not an argument, so it stays out
    of shell history and process listings).

    \b
    Example:
      printf %s "$KEY" | fleetserve tenant digest
    """
    presented = sys.stdin.read().strip()
    if not presented:
        raise click.UsageError("give the key on standard input")
    click.echo(key_digest(presented))
