"""The email channel: its rules (address, limits, how SMTP outcomes end a message) and the
message itself, headers (incl. RFC 8058 one-click unsubscribe) and body.

With the message's signed links (`MessageLinks`, served by delivery's HTTP endpoint) the mail
carries the https one-click unsubscribe link beside the mailto one, its text's links lead through
click links, and it gains an HTML alternative (the same text, escaped, with the open pixel).
Without them it is plain text with the mailto unsubscribe only.

`email_bytes` writes the message as it goes over SMTP (RFC 5322 + MIME, CRLF line
endings). It is built by hand rather than with `email.message.EmailMessage`, whose
header machinery costs more per mail than the send rate the service is built for
allows (see bench/README.md); `compose_email` gives the same message parsed, for
callers that want an object.
"""

from __future__ import annotations

import binascii
import functools
import re
from datetime import datetime
from email import policy
from email.header import Header
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import format_datetime, formataddr, parseaddr
from typing import TYPE_CHECKING
from urllib.parse import quote

from services.delivery.domain.channels.base import (
    INVALID_ADDRESS,
    MOMENT_VARIABLES,
    NO_ADDRESS,
    PERSON_VARIABLES,
    Channel,
    OutcomeKind,
    SendFailure,
    SendOutcome,
)
from services.delivery.domain.rendering import DEFAULT_LIMITS
from services.delivery.domain.states import (
    BOUNCED,
    FAILED,
    HARD_BOUNCE,
    OUTCOME_UNKNOWN,
    SENT,
    Final,
    after_transient,
)
from services.delivery.domain.tracking import ONE_CLICK_BODY, MessageLinks, tracked_parts

if TYPE_CHECKING:
    from services.delivery.domain.decision import ProfileView

DEFAULT_DOMAIN = "relevans.local"
MAX_LINE = 998  # RFC 5322 line length limit, without CRLF
MAX_ADDRESS_CHARS = 320
# The server refused the message (a 5xx reply).
SMTP_REJECTED = "smtp_rejected"

# Replies to RCPT that refuse the mailbox itself (RFC 5321 4.2.3): no such user, not local,
# mailbox name not allowed.
ADDRESS_REFUSED_CODES = frozenset({550, 551, 553})
# RFC 3463 enhanced status "5.1.x": a permanent failure of the addressing (bad mailbox, bad
# domain, ...), after RCPT or DATA whatever the basic code; but 5.1.7 and 5.1.8 are the
# sender's address.
_BAD_ADDRESS_STATUS = re.compile(r"^\s*5\.1\.(?!7\b|8\b)\d{1,3}\b")

_ADDRESS = re.compile(r"^[^@\s<>,;:\"()\[\]\\]+@[^@\s<>,;:\"()\[\]\\]+$")


# ---- the channel's rules ------------------------------------------------------------------------


def is_address(value: str) -> bool:
    return bool(_ADDRESS.match(value)) and len(value) <= MAX_ADDRESS_CHARS


def smtp_final(outcome: SendOutcome, attempt: int) -> Final:
    """Sent on 250, failed for good on a refusal or an unknown outcome, else retried."""
    if outcome.kind == "sent":
        return Final(SENT, f"smtp: {outcome.detail}")
    if outcome.kind == "permanent":
        return Final(FAILED, f"{SMTP_REJECTED}: {outcome.detail}")
    if outcome.kind == "bounced":
        return Final(BOUNCED, f"{HARD_BOUNCE}: smtp: {outcome.detail}")
    if outcome.kind == "unknown":
        return Final(FAILED, f"{OUTCOME_UNKNOWN}: {outcome.detail}")
    return after_transient(attempt, f"smtp: {outcome.detail}")


class EmailChannel(Channel):
    name = "email"
    limits = DEFAULT_LIMITS
    variables = PERSON_VARIABLES | MOMENT_VARIABLES | {"email"}

    def address(self, profile: ProfileView) -> str:
        return profile.email.strip()

    def address_problem(self, address: str) -> str | None:
        if not address:
            return NO_ADDRESS
        if not is_address(address):
            return INVALID_ADDRESS
        return None

    def classify(self, failure: SendFailure) -> OutcomeKind:
        """A reply is transient when it is 4xx or came while connecting (a busy server turning
        the session away), permanent when it is 5xx, and a hard bounce when it refuses the
        recipient for good (550/551/553 to RCPT, or an enhanced status 5.1.x of the recipient
        to RCPT or DATA); without a reply the session broke, which is of unknown outcome once
        the content was on the wire (stage "data")."""
        if failure.code is None:
            return "unknown" if failure.stage == "data" else "transient"
        if failure.stage == "connect" or failure.code < 500:
            return "transient"
        if failure.stage == "rcpt" and failure.code in ADDRESS_REFUSED_CODES:
            return "bounced"
        if failure.stage in ("rcpt", "data") and _BAD_ADDRESS_STATUS.match(failure.detail):
            return "bounced"
        return "permanent"

    def final(self, outcome: SendOutcome, attempt: int) -> Final:
        return smtp_final(outcome, attempt)


# ---- the message --------------------------------------------------------------------------------


# The sender is the same for every mail of a process: parsed once, not twice per mail.
@functools.lru_cache(maxsize=64)
def envelope_sender(sender: str) -> str:
    """The bare address of a From value: "relevans <no-reply@x.org>" -> "no-reply@x.org"."""
    return parseaddr(sender)[1] or sender


@functools.lru_cache(maxsize=64)
def sender_domain(sender: str) -> str:
    _, _, domain = envelope_sender(sender).rpartition("@")
    return domain or DEFAULT_DOMAIN


def message_id_header(message_id: str, sender: str) -> str:
    return f"<{message_id}@{sender_domain(sender)}>"


def list_unsubscribe(message_id: str, sender: str, links: MessageLinks | None = None) -> str:
    mailto = f"<mailto:unsubscribe@{sender_domain(sender)}?subject={quote('unsubscribe ' + message_id)}>"
    return f"{mailto}, <{links.unsubscribe}>" if links is not None else mailto


def _one_line(name: str, value: str) -> str:
    """A header value on one line; a CR or LF in it is refused (ValueError), never folded away:
    text after a line break would become headers of its own."""
    if "\r" in value or "\n" in value:
        raise ValueError(f"the {name} header would hold a line break (CR or LF)")
    return " ".join(value.split())


def _text_header(name: str, value: str) -> str:
    """An unstructured header value: as is when short ASCII, else RFC 2047 encoded words."""
    value = _one_line(name, value)
    if value.isascii() and len(value) <= 900:
        return value
    return Header(value, "utf-8", maxlinelen=76).encode(linesep="\r\n")


def _address_header(header: str, value: str) -> str:
    value = _one_line(header, value)
    if value.isascii():
        return value
    name, address = parseaddr(value)
    if not address:
        return value
    return formataddr((name, address), charset="utf-8")


def _body(text: str) -> tuple[str, bytes]:
    """(Content-Transfer-Encoding, encoded body with CRLF line endings)."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if text.isascii() and all(len(line) <= MAX_LINE for line in lines):
        return "7bit", "\r\n".join(lines).encode("ascii")
    encoded = binascii.b2a_qp("\n".join(lines).encode("utf-8"), istext=True)
    return "quoted-printable", encoded.replace(b"\n", b"\r\n")


def _part(content_type: str, text: str) -> bytes:
    encoding, body = _body(text)
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    head = f'Content-Type: {content_type}; charset="utf-8"\r\nContent-Transfer-Encoding: {encoding}\r\n\r\n'
    return head.encode("ascii") + body


def email_bytes(
    *,
    message_id: str,
    sender: str,
    recipient: str,
    subject: str,
    body_text: str,
    now: datetime,
    links: MessageLinks | None = None,
) -> bytes:
    """The whole message as it goes over the wire; with `links`, tracked (see the module's doc).
    ValueError when a header value holds a line break."""
    headers = [
        ("From", _address_header("From", sender)),
        ("To", _one_line("To", recipient)),
        ("Subject", _text_header("Subject", subject)),
        ("Date", format_datetime(now)),
        ("Message-ID", message_id_header(message_id, sender)),
        ("List-Unsubscribe", list_unsubscribe(message_id, sender, links)),
    ]
    if links is not None:
        headers.append(("List-Unsubscribe-Post", ONE_CLICK_BODY))
    headers.append(("MIME-Version", "1.0"))
    head = "".join(f"{name}: {value}\r\n" for name, value in headers).encode("utf-8")
    if links is None:
        return head + _part("text/plain", body_text)
    # Never in a part: quoted-printable never writes "=_", and no rendered text knows the message id.
    # The line break before a boundary belongs to it, so each part's own last one is kept.
    plain, html = tracked_parts(body_text, links)
    boundary = f"=_rv_{message_id}"
    return (
        head
        + f'Content-Type: multipart/alternative; boundary="{boundary}"\r\n\r\n--{boundary}\r\n'.encode()
        + _part("text/plain", plain)
        + f"\r\n--{boundary}\r\n".encode()
        + _part("text/html", html)
        + f"\r\n--{boundary}--\r\n".encode()
    )


def compose_email(
    *,
    message_id: str,
    sender: str,
    recipient: str,
    subject: str,
    body_text: str,
    now: datetime,
    links: MessageLinks | None = None,
) -> EmailMessage:
    """The same message, parsed."""
    raw = email_bytes(
        message_id=message_id,
        sender=sender,
        recipient=recipient,
        subject=subject,
        body_text=body_text,
        now=now,
        links=links,
    )
    # Stored as a mail client keeps it: with the platform's "\n" line endings.
    parsed = BytesParser(policy=policy.default).parsebytes(raw.replace(b"\r\n", b"\n"))
    assert isinstance(parsed, EmailMessage)
    return parsed
