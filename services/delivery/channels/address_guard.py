"""The address check of webhook URLs: resolve the host once, check every address, and let the
connection go only to the addresses checked.

The host is resolved through an injected `Resolver` (production: the event loop's
getaddrinfo); the request then connects to one of exactly those addresses (the transport
pins them, see `channels/webhook.py`), so a name that answers a public address to the check
and a private one to the connection (DNS rebinding) gains nothing. Which addresses pass is
`domain/addresses.py`; the settings loosen it:

- `RELEVANS_WEBHOOK_ALLOW_PRIVATE`: loopback, private, link-local and CGNAT addresses pass
  (cloud metadata, multicast and unspecified ones never do);
- `RELEVANS_WEBHOOK_ALLOW_INSECURE`: plain http URLs pass;
- `RELEVANS_WEBHOOK_ALLOW_ADDRESSES`: exact host:port pairs skip the address check and the
  https rule (`relevans up` lists its demo receiver there).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from relevans.kit.settings import Settings
from services.delivery.domain.addresses import address_problem, parse_address
from services.delivery.domain.webhooks import (
    ADDRESS_BLOCKED,
    WebhookEndpoint,
    check_endpoint_fields,
    endpoint_timeout,
    host_port,
    new_secret,
    url_host,
    url_port,
    url_problem,
)

# host -> its IP addresses; raises OSError when the name does not resolve.
Resolver = Callable[[str], Awaitable[Sequence[str]]]

# How long resolving a name may take before the attempt counts as not connected.
RESOLVE_TIMEOUT_S = 10.0


async def system_resolver(host: str) -> list[str]:
    """The host's addresses from the operating system's resolver (getaddrinfo)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class AddressRefused(Exception):
    """The URL may never be posted to as it is (permanent); the message says why."""


class NameUnresolved(Exception):
    """The host did not resolve now (transient): nothing was sent."""


def parse_allowed(value: str) -> frozenset[str]:
    """The host:port pairs of `RELEVANS_WEBHOOK_ALLOW_ADDRESSES`, lower case."""
    return frozenset(p.strip().lower() for p in value.split(",") if p.strip())


@dataclass(frozen=True, slots=True)
class AddressRules:
    allow_insecure: bool = False
    allow_private: bool = False
    exempt: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def from_settings(cls, settings: Settings) -> AddressRules:
        return cls(
            allow_insecure=settings.webhook_allow_insecure,
            allow_private=settings.webhook_allow_private,
            exempt=parse_allowed(settings.webhook_allow_addresses),
        )


@dataclass(frozen=True, slots=True)
class CheckedTarget:
    """A URL that passed the check, with the only addresses it may be connected to."""

    url: str
    host: str
    port: int
    addresses: tuple[str, ...]


class AddressGuard:
    def __init__(self, rules: AddressRules, resolve: Resolver = system_resolver) -> None:
        self.rules = rules
        self.resolve = resolve

    def url_problem(self, url: str) -> str | None:
        """What is wrong with the URL itself (scheme, credentials, ...), before resolving it."""
        return url_problem(url, allow_insecure=self.rules.allow_insecure, exempt=self.rules.exempt)

    async def check(self, url: str) -> CheckedTarget:
        """The URL with the addresses it may be connected to; AddressRefused (reason
        "address_blocked: ...") or NameUnresolved when it may not be posted to now."""
        problem = self.url_problem(url)
        if problem:
            raise AddressRefused(f"{ADDRESS_BLOCKED}: the URL {problem}")
        parts = urlsplit(url)
        host, port = url_host(parts), url_port(parts)
        addresses = await self._addresses(host)
        if host_port(parts) not in self.rules.exempt:
            for address in addresses:
                why = address_problem(address, allow_private=self.rules.allow_private)
                if why:
                    said = (
                        f"{address} is {why}" if address == host else f"{host} resolves to {address}, {why}"
                    )
                    raise AddressRefused(f"{ADDRESS_BLOCKED}: {said}")
        return CheckedTarget(url=url, host=host, port=port, addresses=addresses)

    async def endpoint_to_save(self, endpoint_id: str, url: str, timeout_s: float) -> WebhookEndpoint:
        """The endpoint to save (with a new secret, kept only if it is created or rotated), or
        InvalidArgument naming each bad field; the URL is resolved and checked as a send would."""
        v = check_endpoint_fields(
            endpoint_id,
            url,
            timeout_s,
            allow_insecure=self.rules.allow_insecure,
            exempt=self.rules.exempt,
        )
        if not any(item.field == "endpoint.url" for item in v.items):
            refusal = await self.refusal(url)
            if refusal:
                v.add("endpoint.url", refusal)
        v.raise_if_any()
        return WebhookEndpoint(endpoint_id, url, new_secret(), endpoint_timeout(timeout_s))

    async def refusal(self, url: str) -> str | None:
        """Why `url` may not be saved as a webhook URL now (for `endpoint.url`), or None."""
        try:
            await self.check(url)
        except AddressRefused as exc:
            return str(exc).removeprefix(f"{ADDRESS_BLOCKED}: ")
        except NameUnresolved as exc:
            return str(exc)
        return None

    async def _addresses(self, host: str) -> tuple[str, ...]:
        if parse_address(host) is not None:
            return (host,)
        try:
            found = await asyncio.wait_for(self.resolve(host), RESOLVE_TIMEOUT_S)
        except Exception as exc:  # OSError (no such name), TimeoutError, whatever the resolver raises
            raise NameUnresolved(f"{host} does not resolve: {exc}") from None
        if not found:
            raise NameUnresolved(f"{host} does not resolve")
        return tuple(dict.fromkeys(found))
