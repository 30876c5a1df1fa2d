"""Webhook endpoints, the payload and its signature (Standard Webhooks, v1). Pure.

A webhook message is posted as JSON to the endpoint of its template and signed with the
endpoint's secret, so the receiver knows it came from us and was not altered:

- `webhook-id`: the message id, the same on every attempt (the receiver's deduplication key);
- `webhook-timestamp`: unix seconds when the attempt was signed (receivers refuse stale ones);
- `webhook-signature`: "v1," + base64(HMAC-SHA256(key, f"{id}.{timestamp}.{body}")), where
  the key is the secret's bytes after "whsec_".
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import SplitResult, urlsplit

from relevans.kit.errors import Violations
from relevans.kit.resource_ids import resource_id_problem

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32
DEFAULT_TIMEOUT = timedelta(seconds=10)
MAX_TIMEOUT = timedelta(seconds=30)
MAX_URL_CHARS = 2048
# How far a receiver lets a signature's timestamp stray from its own clock.
TIMESTAMP_TOLERANCE = timedelta(minutes=5)
# The payload's `type`: a trigger's message, handed over as an event.
MESSAGE_TYPE = "relevans.message"

# Stable reason codes of failed webhook messages (a detail follows after ": ").
ADDRESS_BLOCKED = "address_blocked"
ENDPOINT_NOT_FOUND = "webhook_endpoint_not_found"
WEBHOOK_REJECTED = "webhook_rejected"
REDIRECT_NOT_FOLLOWED = "redirect_not_followed"
SECRET_UNUSABLE = "webhook_secret_unusable"


@dataclass(frozen=True, slots=True)
class WebhookEndpoint:
    endpoint_id: str
    url: str
    secret: str
    timeout: timedelta = DEFAULT_TIMEOUT
    updated_at: datetime | None = None


# ---- the secret and the signature ---------------------------------------------------------------


def new_secret() -> str:
    """A fresh endpoint secret: "whsec_" + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def secret_key(secret: str) -> bytes:
    """The HMAC key of a "whsec_..." secret; ValueError when it is not one."""
    encoded = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except binascii.Error as exc:
        raise ValueError("webhook secret is not base64") from exc
    if not key:
        raise ValueError("webhook secret is empty")
    return key


def signature(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value of one attempt."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(secret: str, message_id: str, now: datetime, body: bytes) -> dict[str, str]:
    """The headers of one attempt, signed at `now`."""
    timestamp = int(now.timestamp())
    return {
        "content-type": "application/json",
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(secret, message_id, timestamp, body),
    }


def verification_problem(secret: str, headers: Mapping[str, str], body: bytes, now: datetime) -> str | None:
    """Why a received webhook is not genuine (as a receiver checks it), or None when it is."""
    lowered = {k.lower(): v for k, v in headers.items()}
    message_id = lowered.get("webhook-id", "")
    stamp = lowered.get("webhook-timestamp", "")
    offered = lowered.get("webhook-signature", "").split()
    if not (message_id and stamp and offered):
        return "missing webhook-id, webhook-timestamp or webhook-signature"
    try:
        timestamp = int(stamp)
    except ValueError:
        return "webhook-timestamp is not unix seconds"
    if abs(now.timestamp() - timestamp) > TIMESTAMP_TOLERANCE.total_seconds():
        return "webhook-timestamp is too far from now"
    expected = signature(secret, message_id, timestamp, body).encode()
    if not any(hmac.compare_digest(expected, s.encode()) for s in offered):
        return "no matching signature"
    return None


# ---- the payload --------------------------------------------------------------------------------


def payload(
    *,
    message_id: str,
    trigger_id: str,
    profile_id: str,
    subject: str,
    text: str,
    variables: Mapping[str, Any],
    now: datetime,
) -> bytes:
    """The JSON body of a webhook message (README, "Webhooks")."""
    document = {
        "type": MESSAGE_TYPE,
        "timestamp": now.isoformat().replace("+00:00", "Z"),
        "data": {
            "message_id": message_id,
            "trigger_id": trigger_id,
            "profile_id": profile_id,
            "subject": subject,
            "text": text,
            "variables": dict(variables),
        },
    }
    return json.dumps(document, ensure_ascii=False, separators=(",", ":"), default=str).encode()


# ---- endpoints as clients send them -------------------------------------------------------------


def url_host(url: SplitResult) -> str:
    """The URL's host as the address check sees it: lower case, IPv6 without brackets."""
    return (url.hostname or "").lower()


def url_port(url: SplitResult) -> int:
    """The URL's port, the scheme's default when it names none; ValueError when it is no port."""
    port = url.port
    return port if port is not None else (443 if url.scheme == "https" else 80)


def host_port(url: SplitResult) -> str:
    """ "host:port" as `RELEVANS_WEBHOOK_ALLOW_ADDRESSES` lists it ("[::1]:8080" for IPv6)."""
    host = url_host(url)
    return f"[{host}]:{url_port(url)}" if ":" in host else f"{host}:{url_port(url)}"


def url_problem(url: str, *, allow_insecure: bool, exempt: frozenset[str] = frozenset()) -> str | None:
    """Why `url` cannot be a webhook URL, before its host is resolved, or None. A URL whose
    host:port is in `exempt` may be plain http."""
    if not url:
        return "is required"
    if len(url) > MAX_URL_CHARS:
        return f"must be at most {MAX_URL_CHARS} characters"
    if not url.isascii() or any(c.isspace() or ord(c) < 32 for c in url):
        return "must be an ASCII URL without spaces or control characters"
    try:
        parts = urlsplit(url)
        port = url_port(parts)
    except ValueError:
        return "is not a valid URL"
    if parts.scheme not in ("https", "http"):
        return "must be an https URL"
    if parts.username is not None or parts.password is not None:
        return "must not carry credentials (user:password@)"
    host = url_host(parts)
    if not host:
        return "must name a host"
    if not 0 < port < 65536:
        return "has an invalid port"
    if parts.scheme == "http" and not allow_insecure and host_port(parts) not in exempt:
        return "must be an https URL"
    return None


def timeout_problem(timeout_s: float) -> str | None:
    if timeout_s < 0:
        return "must not be negative"
    if timeout_s > MAX_TIMEOUT.total_seconds():
        return f"must be at most {int(MAX_TIMEOUT.total_seconds())} s"
    return None


def endpoint_timeout(timeout_s: float) -> timedelta:
    """The timeout of a valid `timeout_s`: 0 means the default."""
    return timedelta(seconds=timeout_s) if timeout_s else DEFAULT_TIMEOUT


def check_endpoint_fields(
    endpoint_id: str, url: str, timeout_s: float, *, allow_insecure: bool, exempt: frozenset[str]
) -> Violations:
    """The field violations of an endpoint before its host is resolved (`endpoint.url`, ...)."""
    v = Violations()
    problem = resource_id_problem(endpoint_id)
    if problem:
        v.add("endpoint.endpoint_id", problem)
    problem = url_problem(url, allow_insecure=allow_insecure, exempt=exempt)
    if problem:
        v.add("endpoint.url", problem)
    problem = timeout_problem(timeout_s)
    if problem:
        v.add("endpoint.timeout", problem)
    return v
