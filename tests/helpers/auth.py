"""Bearer tokens for calling the services under test, signed with the secret their settings carry."""

from __future__ import annotations

from dataclasses import dataclass

from relevans.kit.auth import mint_token
from relevans.kit.grpc_client import bearer

TEST_SECRET = "test-secret"

Metadata = tuple[tuple[str, str]]


def token(tenant: str, *scopes: str) -> Metadata:
    """gRPC metadata carrying a token of `tenant` with `scopes` (admin when none are given)."""
    return bearer(mint_token(TEST_SECRET, tenant, list(scopes) or ["admin"]))


@dataclass(frozen=True)
class Tokens:
    """`token()` with a test module's own tenant and scopes, used when a call names none."""

    tenant: str
    scopes: tuple[str, ...] = ("admin",)

    def __call__(self, tenant: str | None = None, *scopes: str) -> Metadata:
        return token(tenant or self.tenant, *(scopes or self.scopes))
