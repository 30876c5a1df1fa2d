"""Consent per purpose and channel: validation, and how a merged profile's consents combine."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from relevans.kit.errors import Violations
from services.profile.domain.events import check_text

# Stored and compared as these short names; the servicer maps them to and from the proto enums.
PURPOSES = ("marketing", "transactional", "profiling")
CHANNELS = ("email", "sms", "web", "webhook")
STATUSES = ("granted", "denied", "withdrawn")
MAX_SOURCE_CHARS = 64
MAX_EVIDENCE_CHARS = 2048


@dataclass(frozen=True, slots=True)
class ConsentInput:
    """A consent decision as a client reports it; names as in PURPOSES/CHANNELS/STATUSES,
    "unspecified" (or anything else) when the client left the enum unset or sent an unknown value."""

    purpose: str
    channel: str
    status: str
    source: str = ""
    evidence: str = ""


@dataclass(frozen=True, slots=True)
class Consent:
    """A recorded decision: the current one for its (purpose, channel) is the latest."""

    purpose: str
    channel: str
    status: str
    source: str
    evidence: str
    recorded_at: datetime

    @property
    def key(self) -> tuple[str, str]:
        return (self.purpose, self.channel)


def _check_choice(value: str, allowed: Sequence[str], path: str, violations: Violations) -> None:
    if value not in allowed:
        if not value or value == "unspecified":
            violations.add(path, "is required")
        else:
            violations.add(path, f"must be one of {', '.join(allowed)}")


def check_consent(
    raw: ConsentInput,
    prefix: str,
    now: datetime,
    violations: Violations,
    *,
    default_source: str,
) -> Consent | None:
    """A valid `Consent` recorded at `now`, or None after recording violations under `prefix`."""
    before = len(violations.items)
    _check_choice(raw.purpose, PURPOSES, f"{prefix}.purpose", violations)
    _check_choice(raw.channel, CHANNELS, f"{prefix}.channel", violations)
    _check_choice(raw.status, STATUSES, f"{prefix}.status", violations)
    check_text(raw.source, f"{prefix}.source", violations, MAX_SOURCE_CHARS)
    check_text(raw.evidence, f"{prefix}.evidence", violations, MAX_EVIDENCE_CHARS)
    if len(violations.items) > before:
        return None
    return Consent(
        purpose=raw.purpose,
        channel=raw.channel,
        status=raw.status,
        source=raw.source or default_source,
        evidence=raw.evidence,
        recorded_at=now,
    )


def validate_consent(raw: ConsentInput, now: datetime, *, default_source: str = "api") -> Consent:
    """Validate the consent of a `SetConsent` request; violations are named `consent.<field>`."""
    violations = Violations()
    consent = check_consent(raw, "consent", now, violations, default_source=default_source)
    violations.raise_if_any()
    assert consent is not None
    return consent


def validate_set_consent(profile_id: str, raw: ConsentInput, now: datetime) -> Consent:
    """Validate a `SetConsent` request: the profile id and `consent.<field>`."""
    violations = Violations()
    if not profile_id:
        violations.add("profile_id", "is required")
    consent = check_consent(raw, "consent", now, violations, default_source="api")
    violations.raise_if_any()
    assert consent is not None
    return consent


def current_view(consents: Iterable[Consent]) -> list[Consent]:
    """The latest decision per (purpose, channel), ordered by purpose and channel."""
    latest: dict[tuple[str, str], Consent] = {}
    for c in consents:
        prev = latest.get(c.key)
        if prev is None or c.recorded_at >= prev.recorded_at:
            latest[c.key] = c
    return [latest[k] for k in sorted(latest)]
