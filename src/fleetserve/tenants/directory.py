"""Who is asking: tenants, their keys and what each may use. Pure: the gateway hands in the bearer token
it read, the simulator the tenant a trace request names.

Keys are never stored: the fleet file (or Redis) holds the SHA-256 hex digest of each key, and a key a
client presents is hashed and compared with every stored digest in constant time, so neither the key nor
which digest it came close to shows in the time an answer takes.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from fleetserve.pipeline.stage import Refuse

ANONYMOUS = "anonymous"


def key_digest(key: str) -> str:
    """The SHA-256 hex digest a fleet file stores for an API key."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class Limits:
    """A tenant's quotas; None is unlimited. `rpm`/`tpm` are per minute over a sliding window, `tpm`
    counting prompt tokens at admission and output tokens as they are produced."""

    rpm: int | None = None
    tpm: int | None = None
    max_in_flight: int | None = None
    max_queue_s: float = 30.0

    @property
    def bounded(self) -> bool:
        return self.rpm is not None or self.tpm is not None or self.max_in_flight is not None


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    key_digests: tuple[str, ...] = field(default=(), repr=False)
    weight: float = 1.0  # VTC share
    priority: int = 0  # higher first; < 0 sheddable under pressure
    models: frozenset[str] | None = None  # models and adapters it may use; None: all
    limits: Limits = field(default_factory=Limits)

    def may_use(self, name: str) -> bool:
        """`name` is the model or adapter a request asks for, as the client wrote it."""
        return self.models is None or name in self.models


DEFAULT_TENANT = Tenant(ANONYMOUS)


class TenantDirectory:
    """The tenants of a fleet. `required`: every request must carry a known key; otherwise a request
    without one (or with one nobody owns) is `anonymous`, with the `anonymous` entry's settings when the
    fleet file has one."""

    def __init__(self, tenants: Iterable[Tenant] = (), *, required: bool = False) -> None:
        self.required = required
        self._tenants: dict[str, Tenant] = {}
        self._file_digests: list[tuple[bytes, Tenant]] = []
        for tenant in tenants:
            self._tenants[tenant.name] = tenant
            self._file_digests.extend((bytes.fromhex(digest), tenant) for digest in tenant.key_digests)
        self._digests = list(self._file_digests)

    def use_shared_keys(self, digests: Mapping[str, str]) -> list[str]:
        """Keys kept outside the fleet file (Redis): hex digest -> tenant name, on top of the fleet file's
        (replacing the previous shared set). A digest that is not 64 hex characters or names a tenant the
        fleet file does not list is ignored; those are returned, so the caller can say so."""
        shared: list[tuple[bytes, Tenant]] = []
        ignored: list[str] = []
        for digest, name in digests.items():
            tenant = self._tenants.get(name)
            try:
                raw = bytes.fromhex(digest)
            except ValueError:
                raw = b""
            if tenant is None or len(raw) != 32:
                ignored.append(name)
                continue
            shared.append((raw, tenant))
        self._digests = self._file_digests + shared
        return ignored

    def __iter__(self) -> Iterable[Tenant]:
        return iter(self._tenants.values())

    def __len__(self) -> int:
        return len(self._tenants)

    def get(self, name: str | None) -> Tenant:
        """The tenant called `name`, or the anonymous defaults for a name the fleet file does not list."""
        if name is None:
            name = ANONYMOUS
        found = self._tenants.get(name)
        if found is not None:
            return found
        anonymous = self._tenants.get(ANONYMOUS, DEFAULT_TENANT)
        return anonymous if name == ANONYMOUS else Tenant(name, weight=anonymous.weight, limits=Limits())

    def owner(self, key: str) -> Tenant | None:
        """The tenant that owns `key`; every stored digest is compared, in constant time each."""
        presented = hashlib.sha256(key.encode("utf-8")).digest()
        found: Tenant | None = None
        for digest, tenant in self._digests:
            if hmac.compare_digest(presented, digest):
                found = tenant
        return found

    def identify(self, key: str | None) -> Tenant | Refuse:
        """The tenant a request's bearer key names, or the 401 it gets."""
        tenant = self.owner(key) if key else None
        if tenant is not None:
            return tenant
        if self.required:
            message = (
                "You didn't provide an API key. Send it as `Authorization: Bearer KEY`."
                if not key
                else "Incorrect API key provided."
            )
            return Refuse(
                401, message, "unauthorized", error_type="invalid_request_error", code="invalid_api_key"
            )
        return self.get(ANONYMOUS)

    def authorise(self, tenant: Tenant, name: str) -> Refuse | None:
        """None when the tenant may use the model or adapter `name`; otherwise a 403 that names only what
        it asked for, the same whether or not `name` exists, so no other tenant's models show."""
        if tenant.may_use(name):
            return None
        return Refuse(
            403,
            f"The model `{name}` does not exist or you do not have access to it.",
            "forbidden_model",
            error_type="invalid_request_error",
            code="model_not_found",
        )

    def weights(self) -> Mapping[str, float]:
        return {name: tenant.weight for name, tenant in self._tenants.items()}


def jain_index(values: Iterable[float]) -> float:
    """Jain's fairness index of non-negative shares: 1 when equal, 1/n when one takes everything."""
    shares = [value for value in values if math.isfinite(value)]
    if not shares:
        return 1.0
    total = sum(shares)
    squares = sum(value * value for value in shares)
    return 1.0 if squares == 0 else total * total / (len(shares) * squares)
