"""Keys, model permissions and quota arithmetic of the tenants room (pure, no Redis)."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from fleetserve.pipeline import Refuse
from fleetserve.tenants import (
    ANONYMOUS,
    Limits,
    MemoryLedger,
    Tenant,
    TenantDirectory,
    check,
    jain_index,
    key_digest,
    rate_limit_headers,
)
from fleetserve.tenants.quota import WINDOW_S, format_duration

KEY_A = "sk-team-a-0123456789"
KEY_B = "sk-team-b-9876543210"


def directory(required: bool = True) -> TenantDirectory:
    return TenantDirectory(
        [
            Tenant("team-a", (key_digest(KEY_A),), models=frozenset({"llama-3-8b", "lora-a"})),
            Tenant("team-b", (key_digest(KEY_B),), weight=2.0),
        ],
        required=required,
    )


def test_keys_are_matched_by_digest_and_unknown_ones_get_401() -> None:
    tenants = directory()
    assert tenants.owner(KEY_A).name == "team-a"  # type: ignore[union-attr]
    assert tenants.owner(KEY_B).name == "team-b"  # type: ignore[union-attr]
    missing, wrong = tenants.identify(None), tenants.identify("sk-nobody")
    assert isinstance(missing, Refuse) and missing.status == 401 and "didn't provide" in missing.message
    assert isinstance(wrong, Refuse) and wrong.status == 401 and wrong.code == "invalid_api_key"
    assert "sk-nobody" not in wrong.message
    assert key_digest(KEY_A) not in repr(tenants.owner(KEY_A))  # digests stay out of logs too


def test_without_required_keys_a_request_is_anonymous() -> None:
    tenants = directory(required=False)
    assert tenants.identify(None) == Tenant(ANONYMOUS)
    assert tenants.identify("sk-nobody").name == ANONYMOUS  # type: ignore[union-attr]
    assert tenants.identify(KEY_B).name == "team-b"  # type: ignore[union-attr]


def test_a_forbidden_model_gets_403_naming_only_what_was_asked() -> None:
    tenants = directory()
    team_a = tenants.get("team-a")
    assert tenants.authorise(team_a, "llama-3-8b") is None
    assert tenants.authorise(team_a, "lora-a") is None
    for asked in ("qwen-72b", "no-such-model"):
        refusal = tenants.authorise(team_a, asked)
        assert refusal is not None and refusal.status == 403 and refusal.code == "model_not_found"
        assert asked in refusal.message and "llama-3-8b" not in refusal.message
    assert tenants.authorise(tenants.get("team-b"), "anything") is None  # no list: every model


def rpm_tenant(rpm: int | None = None, tpm: int | None = None, in_flight: int | None = None) -> Tenant:
    return Tenant("t", limits=Limits(rpm=rpm, tpm=tpm, max_in_flight=in_flight))


def admit(ledger: MemoryLedger, tenant: Tenant, tokens: int, now: float) -> Refuse | None:
    usage = ledger.reserve(tenant.name, tokens, now)
    refusal = check(tenant, usage, tokens, now)
    if refusal is not None:
        ledger.refund(tenant.name, usage, tokens)
    return refusal


def test_requests_per_minute_refuse_with_retry_after_and_openai_headers() -> None:
    tenant, ledger = rpm_tenant(rpm=3), MemoryLedger()
    assert [admit(ledger, tenant, 10, 600.0 + i) for i in range(3)] == [None, None, None]
    refusal = admit(ledger, tenant, 10, 603.0)
    assert refusal is not None and refusal.status == 429 and refusal.code == "rate_limit_exceeded"
    headers = dict(refusal.headers)
    assert headers["x-ratelimit-limit-requests"] == "3"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"].endswith("s")
    # the refused request was not counted: once the window lets one more in, exactly one fits
    assert refusal.retry_after_s is not None and 0 < refusal.retry_after_s <= 2 * WINDOW_S
    later = 603.0 + refusal.retry_after_s + 1e-6
    assert admit(ledger, tenant, 10, later) is None
    assert admit(ledger, tenant, 10, later) is not None


def test_a_prompt_larger_than_the_token_limit_is_refused_without_retry_after() -> None:
    refusal = admit(MemoryLedger(), rpm_tenant(tpm=100), 101, 0.0)
    assert refusal is not None and refusal.reason == "quota_too_large" and refusal.retry_after_s is None


def test_output_tokens_count_against_the_token_limit() -> None:
    tenant, ledger = rpm_tenant(tpm=1000), MemoryLedger()
    assert admit(ledger, tenant, 100, 0.0) is None
    ledger.release("t")
    ledger.charge("t", 850, 1.0)
    refusal = admit(ledger, tenant, 100, 2.0)
    assert refusal is not None and "tokens per minute" in refusal.message


def test_in_flight_limit_frees_a_place_when_a_request_ends() -> None:
    tenant, ledger = rpm_tenant(in_flight=2), MemoryLedger()
    assert admit(ledger, tenant, 1, 0.0) is None and admit(ledger, tenant, 1, 0.0) is None
    assert admit(ledger, tenant, 1, 0.0) is not None
    ledger.release("t")
    assert admit(ledger, tenant, 1, 0.0) is None


def test_headers_of_an_admitted_request_count_down() -> None:
    tenant, ledger = rpm_tenant(rpm=10, tpm=500), MemoryLedger()
    usage = ledger.reserve("t", 100, 0.0)
    headers = dict(rate_limit_headers(tenant.limits, usage, 0.0))
    assert headers["x-ratelimit-remaining-requests"] == "9"
    assert headers["x-ratelimit-remaining-tokens"] == "400"


def test_durations_are_written_as_openai_writes_them() -> None:
    assert [format_duration(s) for s in (0.25, 1.0, 12.2, 90.0)] == ["250ms", "1s", "13s", "1m30s"]


@settings(max_examples=60, deadline=None)
@given(
    rpm=st.integers(1, 20),
    gaps=st.lists(st.floats(0.0, 20.0, allow_nan=False), min_size=1, max_size=120),
)
def test_no_calendar_minute_admits_more_than_the_limit(rpm: int, gaps: list[float]) -> None:
    """The sliding estimate is never below this minute's own count, so no minute goes over."""
    tenant, ledger = rpm_tenant(rpm=rpm), MemoryLedger()
    now, per_minute = 0.0, {}
    for gap in gaps:
        now += gap
        if admit(ledger, tenant, 1, now) is None:
            ledger.release("t")
            minute = math.floor(now / WINDOW_S)
            per_minute[minute] = per_minute.get(minute, 0) + 1
    assert all(count <= rpm for count in per_minute.values())


def test_jain_index() -> None:
    assert jain_index([5, 5, 5]) == 1.0
    assert math.isclose(jain_index([9, 0, 0]), 1 / 3)


def test_counts_made_during_an_outage_survive_a_minute_boundary_for_the_resync() -> None:
    ledger = MemoryLedger()
    ledger.reserve("t", 10, 59.0)  # counted locally in minute 0 while Redis is away
    assert ledger.rate_counts(61.0) == [("t", 0, 1, 10)]  # Redis is back in minute 1
