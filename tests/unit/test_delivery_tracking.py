"""Signed links of delivery's HTTP endpoint and the tracked email (services/delivery/domain/tracking.py,
domain/channels/email.py)."""

from __future__ import annotations

import base64
import socket
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser

import pytest

from relevans.kit.auth import TokenError, verify_token
from services.delivery.domain.channels.email import email_bytes
from services.delivery.domain.tracking import (
    CLICK,
    OPEN,
    UNSUBSCRIBE,
    ForgedToken,
    LinkMaker,
    LinkSigner,
    LinkToken,
    event_id,
    links_in,
    tracked_parts,
    tracking_key,
    withdrawn_purpose,
)
from services.delivery.http_endpoint import bind, public_url

SECRET = "test-secret-0123456789"
BASE = "https://links.example.com"
signer = LinkSigner(tracking_key(SECRET))
links = LinkMaker(signer, BASE).for_message("shop", "m-1")


def _token_of(url: str, route: str) -> str:
    prefix = f"{BASE}/{route}/"
    assert url.startswith(prefix)
    return url.removeprefix(prefix)


def test_a_token_carries_tenant_message_kind_and_the_exact_url() -> None:
    click = _token_of(links.click("https://shop.example/cart?a=1&b=ü"), "c")
    assert signer.verify(click, CLICK) == LinkToken("shop", "m-1", CLICK, "https://shop.example/cart?a=1&b=ü")
    assert signer.verify(_token_of(links.pixel, "o"), OPEN) == LinkToken("shop", "m-1", OPEN)
    assert signer.verify(_token_of(links.unsubscribe, "u"), UNSUBSCRIBE) == LinkToken(
        "shop", "m-1", UNSUBSCRIBE
    )
    assert all(c.isalnum() or c in "-_." for c in click)


def test_forged_altered_or_misrouted_tokens_are_refused() -> None:
    token = _token_of(links.click("https://shop.example/cart"), "c")
    body, tag = token.split(".")
    payload = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    evil = payload.replace(b"https://shop.example/cart", b"https://evil.example/")
    altered_url = base64.urlsafe_b64encode(evil).rstrip(b"=").decode() + "." + tag
    other_tenant = (
        base64.urlsafe_b64encode(payload.replace(b"shop", b"shoq")).rstrip(b"=").decode() + "." + tag
    )
    other_key = LinkSigner(tracking_key("another-secret")).sign(
        LinkToken("shop", "m-1", CLICK, "https://evil/")
    )
    flipped_tag = body + "." + ("A" if tag[0] != "A" else "B") + tag[1:]
    for bad in (altered_url, other_tenant, other_key, flipped_tag, "", "x", "a.b.c", "!!.!!", "x" * 5000):
        with pytest.raises(ForgedToken):
            signer.verify(bad, CLICK)
    # a valid token only works on its own route
    with pytest.raises(ForgedToken):
        signer.verify(token, OPEN)
    with pytest.raises(ForgedToken):
        signer.verify(_token_of(links.pixel, "o"), UNSUBSCRIBE)


def test_link_tokens_and_bearer_tokens_do_not_pass_for_each_other() -> None:
    """The link key is derived under its own label: a link token is not a bearer token (and the
    bearer token format is not a link token)."""
    with pytest.raises(TokenError):
        verify_token(SECRET, _token_of(links.unsubscribe, "u"), datetime.now(UTC))
    assert tracking_key(SECRET) != SECRET.encode()


def test_links_are_found_in_plain_text_without_trailing_punctuation() -> None:
    text = "See https://shop.example/cart. Or (http://x.example/a?b=1), not ftp://x or https://"
    assert [text[s:e] for s, e in links_in(text)] == ["https://shop.example/cart", "http://x.example/a?b=1"]


def test_the_html_alternative_escapes_the_text_and_tracks_links_and_opens() -> None:
    _, html = tracked_parts("Hi <b>Ada</b> & co\nhttps://shop.example/?a=1&b=2\n", links)
    assert "Hi &lt;b&gt;Ada&lt;/b&gt; &amp; co" in html
    assert "https://shop.example/?a=1&amp;b=2</a>" in html
    assert f'href="{BASE}/c/' in html
    assert f'<img src="{BASE}/o/' in html
    assert "<b>" not in html


def _parsed(raw: bytes) -> EmailMessage:
    mail = BytesParser(policy=policy.default).parsebytes(raw.replace(b"\r\n", b"\n"))
    assert isinstance(mail, EmailMessage)
    return mail


def test_tracked_mail_has_one_click_headers_and_text_and_html_with_click_links() -> None:
    raw = email_bytes(
        message_id="m-1",
        sender="relevans <no-reply@relevans.local>",
        recipient="ada@example.com",
        subject="Your cart",
        body_text="Hi Ada, ü\nyour cart: https://shop.example/cart\n",
        now=datetime(2026, 1, 5, 9, tzinfo=UTC),
        links=links,
    )
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    mail = _parsed(raw)
    mailto, https = [part.strip(" <>") for part in mail["List-Unsubscribe"].split(",")]
    assert mailto.startswith("mailto:unsubscribe@relevans.local")
    assert signer.verify(_token_of(https, "u"), UNSUBSCRIBE) == LinkToken("shop", "m-1", UNSUBSCRIBE)
    assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert mail.get_content_type() == "multipart/alternative"
    text = mail.get_body(preferencelist=("plain",))
    html = mail.get_body(preferencelist=("html",))
    assert text is not None and html is not None
    plain = text.get_content()
    assert "https://shop.example/cart" not in plain and plain.startswith("Hi Ada, ü\nyour cart: http")
    assert plain.endswith("\n") and not plain.endswith("\n\n")
    [(s, e)] = links_in(plain)
    assert signer.verify(_token_of(plain[s:e], "c"), CLICK).url == "https://shop.example/cart"
    assert "/o/" in html.get_content()


def test_engagement_event_ids_are_stable_per_engagement() -> None:
    assert event_id("m-1", OPEN) == event_id("m-1", OPEN) != event_id("m-2", OPEN)
    assert event_id("m-1", CLICK, "https://a/") == event_id("m-1", CLICK, "https://a/")
    assert event_id("m-1", CLICK, "https://a/") != event_id("m-1", CLICK, "https://b/")
    assert len(event_id("m" * 36, CLICK, "https://a/" * 500)) <= 128


def test_unsubscribing_from_a_transactional_message_withdraws_marketing() -> None:
    assert withdrawn_purpose("marketing") == "marketing"
    assert withdrawn_purpose("transactional") == "marketing"


def test_the_endpoint_refuses_a_port_in_use_and_names_its_own_port_in_links() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"cannot listen for HTTP on 127.0.0.1:{port}"):
            bind(f"127.0.0.1:{port}")
    sock = bind("127.0.0.1:0")
    try:
        assert public_url(sock) == f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()
    everywhere = bind("0.0.0.0:0")
    try:
        assert public_url(everywhere) == f"http://localhost:{everywhere.getsockname()[1]}"
    finally:
        everywhere.close()
