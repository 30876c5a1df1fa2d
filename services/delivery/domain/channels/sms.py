"""The SMS channel: its rules (the phone number, limits, segments, how an HTTP provider's answers
end a message). Pure; the sending is `services/delivery/channels/sms.py`.

- Address: the profile's `phone` trait in international format ("+" and the country code; spaces
  and hyphens allowed), sent as E.164 (+46701234567). A number without the "+" is refused as
  `invalid_address`, never guessed from a region: the platform serves people of many countries.
- Subject: an SMS has none. SMS templates leave `subject` empty (PutTemplate refuses one), so
  `RenderLimits.subject_chars` is 0.
- Segments: a body in the GSM 03.38 alphabet is sent as GSM-7 (160 septets in one message, 153
  per part when split; the extension characters ^{}\\[~]|€ and form feed take 2 septets); any
  other character makes the whole body UCS-2 (70 UTF-16 code units in one, 67 per part; an emoji
  is 2). A character is never split between parts. A body over the configured number of segments
  (`RELEVANS_SMS_MAX_SEGMENTS`) is not sent: suppressed `sms_too_long: 6 segments > 4`, as any
  rendered message over its channel's limits is (no provider was asked).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import phonenumbers

from services.delivery.domain.channels.base import (
    INVALID_ADDRESS,
    NO_ADDRESS,
    Channel,
    OutcomeKind,
    SendFailure,
    SendOutcome,
)
from services.delivery.domain.rendering import RenderLimits
from services.delivery.domain.states import FAILED, OUTCOME_UNKNOWN, SENT, Final, after_transient

if TYPE_CHECKING:
    from services.delivery.domain.decision import ProfileView

# Reason codes of the channel (a detail follows after ": ").
SMS_TOO_LONG = "sms_too_long"
SMS_REJECTED = "sms_rejected"

# Stages of an attempt (`SendFailure.stage`): before the request went out, or after.
CONNECT = "connect"
REQUEST = "request"

SMS_LIMITS = RenderLimits(
    subject_source_bytes=0,
    body_source_bytes=4 * 1024,
    # 10 UCS-2 parts of 3-byte characters are 2,010 bytes; past this no setting could send it.
    output_bytes=8 * 1024,
    subject_chars=0,
)

# GSM 03.38: the basic set (one septet each; the escape 0x1B itself is not text) and the
# extension table (the escape and one septet).
GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENSION = frozenset("\f^{}\\[~]|€")

Encoding = Literal["gsm7", "ucs2"]


@dataclass(frozen=True, slots=True)
class Segments:
    """How a body goes out: its encoding, its length in that encoding's units, and its parts."""

    encoding: Encoding
    units: int
    count: int


# (units in a single message, units per part of a split one)
_SIZES: dict[Encoding, tuple[int, int]] = {"gsm7": (160, 153), "ucs2": (70, 67)}


def _units(text: str) -> tuple[Encoding, list[int]]:
    """The encoding of `text` and the units each character takes in it."""
    if all(c in GSM7_BASIC or c in GSM7_EXTENSION for c in text):
        return "gsm7", [2 if c in GSM7_EXTENSION else 1 for c in text]
    return "ucs2", [2 if ord(c) > 0xFFFF else 1 for c in text]


def sms_segments(text: str) -> Segments:
    """The segments `text` is sent in (an empty text is one)."""
    encoding, widths = _units(text)
    single, per_part = _SIZES[encoding]
    total = sum(widths)
    if total <= single:
        return Segments(encoding, total, 1)
    count, room = 1, per_part
    for width in widths:
        if width > room:
            count, room = count + 1, per_part
        room -= width
    return Segments(encoding, total, count)


def too_long(segments: Segments, max_segments: int) -> str | None:
    """The reason a body of `segments` is not sent, or None."""
    if segments.count > max_segments:
        return f"{SMS_TOO_LONG}: {segments.count} segments > {max_segments}"
    return None


def e164(phone: str) -> str | None:
    """`phone` in E.164 when it is a valid number written internationally, else None."""
    value = phone.strip()
    if not value.startswith("+"):
        return None
    try:
        number = phonenumbers.parse(value, None)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def http_outcome(status: int) -> OutcomeKind:
    """What a provider's HTTP answer means: 2xx took the message; 429 (slow down) and 5xx are
    worth trying again; anything else (4xx, a redirect) refused it for good."""
    if 200 <= status < 300:
        return "sent"
    if status == 429 or status >= 500:
        return "transient"
    return "permanent"


class SmsChannel(Channel):
    name = "sms"
    limits = SMS_LIMITS

    def address(self, profile: ProfileView) -> str:
        """The phone in E.164, or as given when it is not a valid international number."""
        phone = profile.phone.strip()
        return e164(phone) or phone

    def address_problem(self, address: str) -> str | None:
        if not address:
            return NO_ADDRESS
        if e164(address) != address:
            return INVALID_ADDRESS
        return None

    def classify(self, failure: SendFailure) -> OutcomeKind:
        """An HTTP answer by its status; without one, transient when the request never left
        (connection refused, DNS, connect timeout), unknown once it was sent (a timeout or a
        broken connection waiting for the answer): the provider may have taken it."""
        if failure.code is not None:
            return http_outcome(failure.code)
        return "transient" if failure.stage == CONNECT else "unknown"

    def final(self, outcome: SendOutcome, attempt: int) -> Final:
        if outcome.kind == "sent":
            return Final(SENT, f"sms: {outcome.detail}")
        if outcome.kind == "permanent":
            return Final(FAILED, f"{SMS_REJECTED}: {outcome.detail}")
        if outcome.kind == "unknown":
            return Final(FAILED, f"{OUTCOME_UNKNOWN}: {outcome.detail}")
        return after_transient(attempt, f"sms: {outcome.detail}")
