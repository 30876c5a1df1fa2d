"""Bearer tokens that name a tenant and scopes, signed with a shared HMAC secret.

Format: `rv1.<base64url(json claims)>.<base64url(hmac-sha256)>`. Pure logic: the
gRPC interceptor in `server.py` calls `verify_token` for every call. Every token expires:
one minted without an explicit expiry lives `DEFAULT_TOKEN_LIFETIME`, so a token that leaks
does not work for ever.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

SCOPES = ("ingest", "read", "admin")
TENANT_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_PREFIX = "rv1"
DEFAULT_TOKEN_LIFETIME = timedelta(days=30)
# Secrets anyone who read this repository knows (the settings' default, the old compose default):
# `relevans serve` refuses them unless told it is a development run.
PUBLISHED_SECRETS = frozenset({"", "dev-secret-change-me", "change-me-in-production"})


class TokenError(Exception):
    """The token is missing, malformed, forged or expired."""


@dataclass(frozen=True)
class Principal:
    tenant_id: str
    scopes: frozenset[str]
    subject: str = ""
    # Unix time the token stops being valid; None when it never expires.
    expires_at: float | None = None

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(secret: str, body: str) -> str:
    return _b64(hmac.new(secret.encode(), body.encode(), hashlib.sha256).digest())


def mint_token(
    secret: str,
    tenant_id: str,
    scopes: list[str] | tuple[str, ...],
    *,
    subject: str = "",
    expires_at: datetime | None = None,
    issued_at: datetime | None = None,
) -> str:
    """A signed token; without `expires_at` it expires `DEFAULT_TOKEN_LIFETIME` after `issued_at`
    (now when not given)."""
    if not TENANT_RE.match(tenant_id):
        raise ValueError(f"tenant id {tenant_id!r} must match {TENANT_RE.pattern}")
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown or not scopes:
        raise ValueError(f"scopes must be a non-empty subset of {SCOPES}, got {list(scopes)}")
    claims: dict[str, object] = {"ten": tenant_id, "scp": sorted(set(scopes)), "sub": subject}
    if expires_at is None:
        expires_at = (issued_at or datetime.now(UTC)) + DEFAULT_TOKEN_LIFETIME
    claims["exp"] = int(expires_at.timestamp())
    body = _b64(json.dumps(claims, separators=(",", ":")).encode())
    return f"{_PREFIX}.{body}.{_sign(secret, f'{_PREFIX}.{body}')}"


def verify_token(secret: str, token: str, now: datetime) -> Principal:
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != _PREFIX:
        raise TokenError("malformed token")
    expected = _sign(secret, f"{parts[0]}.{parts[1]}")
    if not hmac.compare_digest(expected, parts[2]):
        raise TokenError("bad token signature")
    try:
        claims = json.loads(_unb64(parts[1]))
        tenant = str(claims["ten"])
        scopes = frozenset(str(s) for s in claims["scp"])
    except (ValueError, KeyError, TypeError) as exc:
        raise TokenError("malformed token claims") from exc
    expires_at = float(claims["exp"]) if "exp" in claims else None
    if expires_at is not None and now.timestamp() >= expires_at:
        raise TokenError("token expired")
    return Principal(
        tenant_id=tenant, scopes=scopes, subject=str(claims.get("sub", "")), expires_at=expires_at
    )
