"""Which addresses and URLs a webhook may go to: the pure classification and the URL rules."""

from __future__ import annotations

import pytest

from services.delivery.domain.addresses import address_problem
from services.delivery.domain.webhooks import url_problem


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("10.0.0.1", "a private address"),
        ("172.16.5.4", "a private address"),
        ("192.168.1.1", "a private address"),
        ("169.254.169.254", "a cloud metadata address"),
        ("fd00:ec2::254", "a cloud metadata address"),
        ("169.254.1.1", "a link-local address"),
        ("fe80::1", "a link-local address"),
        ("127.0.0.1", "a loopback address"),
        ("127.8.8.8", "a loopback address"),
        ("::1", "a loopback address"),
        ("fc00::", "a private address"),
        ("fd12:3456::1", "a private address"),
        ("100.64.0.1", "a carrier-grade NAT address"),
        ("0.0.0.0", "the unspecified address"),
        ("::", "the unspecified address"),
        ("224.0.0.1", "a multicast address"),
        ("ff02::1", "a multicast address"),
        ("240.0.0.1", "a private address"),
        ("::ffff:10.0.0.1", "a private address"),
        ("::ffff:127.0.0.1", "a loopback address"),
        ("64:ff9b::a9fe:a9fe", "a cloud metadata address"),
        ("2002:a00:1::", "a private address"),
        ("not-an-ip", "not an IP address"),
    ],
)
def test_non_public_addresses_are_refused_and_named(address: str, kind: str) -> None:
    assert address_problem(address) == kind


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"])
def test_public_addresses_pass(address: str) -> None:
    assert address_problem(address) is None


@pytest.mark.parametrize("address", ["10.0.0.1", "127.0.0.1", "::1", "fc00::", "100.64.0.1", "169.254.1.1"])
def test_allow_private_lets_private_addresses_pass(address: str) -> None:
    assert address_problem(address, allow_private=True) is None


@pytest.mark.parametrize("address", ["169.254.169.254", "fd00:ec2::254", "0.0.0.0", "224.0.0.1"])
def test_some_addresses_no_setting_allows(address: str) -> None:
    assert address_problem(address, allow_private=True) is not None


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("", "is required"),
        ("http://crm.example.com/hook", "must be an https URL"),
        ("ftp://crm.example.com/hook", "must be an https URL"),
        ("https://user:pass@crm.example.com/hook", "must not carry credentials (user:password@)"),
        ("https://token@crm.example.com/hook", "must not carry credentials (user:password@)"),
        ("https:///hook", "must name a host"),
        ("https://crm.example.com:0/hook", "has an invalid port"),
        ("https://crm.example.com:99999/hook", "is not a valid URL"),
        ("https://crm.example.com/ho ok", "must be an ASCII URL without spaces or control characters"),
        ("https://crm.example.com/hook\r\n", "must be an ASCII URL without spaces or control characters"),
        ("https://crm.example.com/" + "a" * 2048, "must be at most 2048 characters"),
    ],
)
def test_bad_urls_are_refused_with_the_reason(url: str, problem: str) -> None:
    assert url_problem(url, allow_insecure=False) == problem


def test_https_urls_pass_and_http_needs_a_setting_or_an_exemption() -> None:
    assert url_problem("https://crm.example.com/hook", allow_insecure=False) is None
    assert url_problem("http://crm.example.com/hook", allow_insecure=True) is None
    exempt = frozenset({"127.0.0.1:8090", "[::1]:8090"})
    assert url_problem("http://127.0.0.1:8090/hooks/crm", allow_insecure=False, exempt=exempt) is None
    assert url_problem("http://[::1]:8090/hooks/crm", allow_insecure=False, exempt=exempt) is None
    assert url_problem("http://127.0.0.1:8091/hooks/crm", allow_insecure=False, exempt=exempt) is not None
