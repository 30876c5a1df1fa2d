"""Outgoing gRPC calls: a default deadline on every call and the bearer token attached."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import grpc


class _Defaults(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, deadline_s: float, token: Callable[[], str] | None) -> None:
        self.deadline_s = deadline_s
        self.token = token

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        metadata = list(details.metadata or [])
        if self.token is not None and not any(k == "authorization" for k, _ in metadata):
            metadata.append(("authorization", f"Bearer {self.token()}"))
        new_details = grpc.aio.ClientCallDetails(
            method=details.method,
            timeout=details.timeout if details.timeout is not None else self.deadline_s,
            metadata=grpc.aio.Metadata(*metadata),
            credentials=details.credentials,
            wait_for_ready=details.wait_for_ready,
        )
        return await continuation(new_details, request)


def open_channel(
    target: str, *, deadline_s: float = 2.0, token: Callable[[], str] | None = None
) -> grpc.aio.Channel:
    """An insecure channel whose calls get `deadline_s` unless they set their own."""
    return grpc.aio.insecure_channel(target, interceptors=[cast(Any, _Defaults(deadline_s, token))])


def bearer(token: str) -> tuple[tuple[str, str]]:
    """Call metadata carrying a bearer token, for clients that pass it per call."""
    return (("authorization", f"Bearer {token}"),)
