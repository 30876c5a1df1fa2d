"""Signed links of delivery's HTTP endpoint (one-click unsubscribe, the open pixel, click
redirects), what a message's text looks like with them, and what each engagement records. Pure.

A link token is `<payload>.<mac>`, both base64url without padding. The payload names the tenant,
the message, the kind of link and, for a click, the exact URL the message carried, so a redirect
can only go where the message pointed, and nothing has to be looked up to know where. The mac is
HMAC-SHA256 of the payload under a key derived from `token_secret` with its own label
(`tracking_key`): a link token is no bearer token, nor the other way round. Anything altered is
refused (`ForgedToken`), the mac compared in constant time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from dataclasses import dataclass
from html import escape
from typing import Final

from services.delivery.domain.states import CLICKED, OPENED, UNSUBSCRIBED

# The kinds of link and the route each is served on.
UNSUBSCRIBE = "unsubscribe"
OPEN = "open"
CLICK = "click"
ROUTES = {UNSUBSCRIBE: "u", OPEN: "o", CLICK: "c"}
_KINDS = {code: kind for kind, code in ROUTES.items()}

# History entries and `rv.delivery.status.<status>` of an engagement (the message stays `sent`).
ENGAGEMENT_STATUS = {OPEN: OPENED, CLICK: CLICKED, UNSUBSCRIBE: UNSUBSCRIBED}
# The event each engagement becomes in profile.
ENGAGEMENT_EVENT = {OPEN: "email_opened", CLICK: "link_clicked", UNSUBSCRIBE: "email_unsubscribed"}
# Where a one-click unsubscribe says it came from in the person's consent record.
UNSUBSCRIBE_SOURCE = "one_click_unsubscribe"
# The body RFC 8058 has a mail client POST.
ONE_CLICK_BODY = "List-Unsubscribe=One-Click"

KEY_LABEL: Final = b"relevans/delivery/link-token/v1"
MAC_BYTES = 16
# Longer tokens are refused before anything is decoded.
MAX_TOKEN_CHARS = 4096
# The URL a click may lead to: what `links_in` finds.
MAX_URL_CHARS = 2048
_SEP = "\x1f"

# A link in plain text: http(s) up to white space or a character that cannot be in one; sentence
# punctuation right after it is not part of it.
_URL = re.compile(r"https?://[^\s<>\"'`{}|\\^\x00-\x1f\x7f]+", re.IGNORECASE)
_TRAILING = ".,;:!?)]"
# The 1x1 transparent GIF the open pixel answers with.
PIXEL_GIF = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")


class ForgedToken(ValueError):
    """The token was not made by this service with this secret, or was altered."""


def tracking_key(secret: str) -> bytes:
    """The link-signing key: derived from the service secret under a label no other use shares."""
    return hmac.new(secret.encode(), KEY_LABEL, hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class LinkToken:
    tenant_id: str
    message_id: str
    kind: str
    # The URL a click leads to ("" for the other kinds).
    url: str = ""


class LinkSigner:
    """Makes and checks link tokens with one key."""

    def __init__(self, key: bytes) -> None:
        self._mac = hmac.new(key, digestmod=hashlib.sha256)

    def _tag(self, payload: bytes) -> bytes:
        mac = self._mac.copy()
        mac.update(payload)
        return mac.digest()[:MAC_BYTES]

    def sign(self, token: LinkToken) -> str:
        payload = _SEP.join((ROUTES[token.kind], token.tenant_id, token.message_id, token.url)).encode()
        return f"{_b64(payload)}.{_b64(self._tag(payload))}"

    def verify(self, text: str, kind: str) -> LinkToken:
        """The token's content when this signer made it for a link of `kind`; else ForgedToken."""
        if len(text) > MAX_TOKEN_CHARS or text.count(".") != 1:
            raise ForgedToken("malformed token")
        body, tag = text.split(".")
        try:
            payload, mac = _unb64(body), _unb64(tag)
        except (binascii.Error, ValueError):
            raise ForgedToken("malformed token") from None
        if not hmac.compare_digest(self._tag(payload), mac):
            raise ForgedToken("bad signature")
        parts = payload.decode("utf-8", "replace").split(_SEP, 3)
        if len(parts) != 4 or _KINDS.get(parts[0]) != kind:
            raise ForgedToken(f"not a {kind} token")
        _, tenant_id, message_id, url = parts
        return LinkToken(tenant_id, message_id, kind, url)


class MessageLinks:
    """The signed links of one message, under the endpoint's public base URL."""

    __slots__ = ("_base", "_message_id", "_signer", "_tenant_id")

    def __init__(self, signer: LinkSigner, base_url: str, tenant_id: str, message_id: str) -> None:
        self._signer = signer
        self._base = base_url.rstrip("/")
        self._tenant_id = tenant_id
        self._message_id = message_id

    def _url(self, kind: str, target: str = "") -> str:
        token = self._signer.sign(LinkToken(self._tenant_id, self._message_id, kind, target))
        return f"{self._base}/{ROUTES[kind]}/{token}"

    @property
    def unsubscribe(self) -> str:
        return self._url(UNSUBSCRIBE)

    @property
    def pixel(self) -> str:
        return self._url(OPEN)

    def click(self, url: str) -> str:
        return self._url(CLICK, url)


class LinkMaker:
    """Each message's links, under the endpoint's public base URL."""

    def __init__(self, signer: LinkSigner, base_url: str) -> None:
        self.signer = signer
        self.base_url = base_url

    def for_message(self, tenant_id: str, message_id: str) -> MessageLinks:
        return MessageLinks(self.signer, self.base_url, tenant_id, message_id)


def links_in(text: str) -> list[tuple[int, int]]:
    """Where the http(s) links of a plain text are: (start, end) of each."""
    found = []
    for m in _URL.finditer(text):
        end = m.end()
        while end > m.start() and text[end - 1] in _TRAILING:
            end -= 1
        if end - m.start() <= MAX_URL_CHARS and end > m.start() + len("https://"):
            found.append((m.start(), end))
    return found


def tracked_parts(text: str, links: MessageLinks) -> tuple[str, str]:
    """The plain text with each link replaced by its click link, and the HTML alternative: the
    text escaped, its line breaks kept, each link a click link, and the open pixel. One pass, one
    signature per link (this is on the send path)."""
    plain: list[str] = []
    html: list[str] = []
    at = 0
    for start, end in links_in(text) if "://" in text else ():
        url, before = text[start:end], text[at:start]
        click = links.click(url)
        plain += (before, click)
        html += (escape(before), f'<a href="{escape(click)}">{escape(url)}</a>')
        at = end
    plain.append(text[at:])
    html.append(escape(text[at:]))
    pixel = f'<img src="{escape(links.pixel)}" width="1" height="1" alt="" style="border:0">'
    page = (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"></head>\n'
        f'<body><div style="white-space:pre-wrap">{"".join(html)}</div>\n{pixel}</body></html>\n'
    )
    return "".join(plain), page


# ---- what an engagement records -----------------------------------------------------------------


def link_key(kind: str, url: str) -> str:
    """What makes a repeat of an engagement the same one: the URL for a click, nothing else."""
    return url if kind == CLICK else ""


def event_id(message_id: str, kind: str, url: str = "") -> str:
    """The profile event's id: the same engagement (the same message, and link for a click) always
    gets the same id, so profile stores it once however often it is reported."""
    suffix = f":{hashlib.sha256(url.encode()).hexdigest()[:16]}" if kind == CLICK else ""
    return f"rv-delivery:{message_id}:{kind}{suffix}"


def withdrawn_purpose(purpose: str) -> str:
    """The consent an unsubscribe from a message of `purpose` withdraws: that purpose's, or
    marketing's for a transactional message, which needs no consent and so cannot be unsubscribed
    from (the person is saying they want no marketing on the channel)."""
    return "marketing" if purpose == "transactional" else purpose
