"""Which IP addresses a webhook may be posted to. Pure.

A webhook URL is chosen by a tenant, so without a check it could make the service post to
itself, to the private network it runs in, or to a cloud metadata service (SSRF). Every
address a URL's host resolves to is classified here; only public (globally routable)
addresses pass, unless the operator allows private ones. Some addresses are never a
webhook's: the cloud metadata services, multicast and the unspecified address.
"""

from __future__ import annotations

import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Cloud instance metadata services (AWS, GCP, Azure, OpenStack; AWS over IPv6).
METADATA_ADDRESSES = frozenset(
    {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
)
# Shared address space of carrier-grade NAT (RFC 6598); Python counts it neither private nor global.
CGNAT = ipaddress.ip_network("100.64.0.0/10")
# IPv6 prefixes that carry an IPv4 address in their last 32 bits (NAT64, RFC 6052 / 8215).
NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


def parse_address(value: str) -> IPAddress | None:
    """The address in `value` ("10.0.0.1", "::1", "fe80::1%eth0"), or None when it is not one."""
    try:
        return ipaddress.ip_address(value.split("%", 1)[0])
    except ValueError:
        return None


def embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, 6to4, NAT64), else None: such an
    address reaches the IPv4 host, so it is classified as that host."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if any(address in net for net in NAT64):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def never_allowed(address: IPAddress) -> str | None:
    """What the address is when no setting may allow it ("a cloud metadata address", ...), else None."""
    inner = embedded_ipv4(address) or address
    if address in METADATA_ADDRESSES or inner in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if inner.is_unspecified:
        return "the unspecified address"
    if inner.is_multicast:
        return "a multicast address"
    return None


def non_public(address: IPAddress) -> str | None:
    """What kind of non-public address this is ("a loopback address", ...), None when it is public."""
    inner = embedded_ipv4(address) or address
    refused = never_allowed(address)
    if refused:
        return refused
    if inner.is_loopback:
        return "a loopback address"
    if inner.is_link_local:
        return "a link-local address"
    if isinstance(inner, ipaddress.IPv4Address) and inner in CGNAT:
        return "a carrier-grade NAT address"
    if inner.is_private:
        return "a private address"
    if inner.is_reserved:
        return "a reserved address"
    if not inner.is_global:
        return "not a public address"
    return None


def address_problem(address: str, *, allow_private: bool = False) -> str | None:
    """Why a webhook may not be posted to `address` ("a private address"), or None when it may.

    With `allow_private` only the addresses no setting allows are refused."""
    parsed = parse_address(address)
    if parsed is None:
        return "not an IP address"
    return never_allowed(parsed) if allow_private else non_public(parsed)
