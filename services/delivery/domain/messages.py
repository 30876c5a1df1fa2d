"""Messages as the API shows them: status, reason and history; paging of ListMessages."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from datetime import datetime

from relevans.kit.errors import FieldViolation, InvalidArgument
from services.delivery.domain.states import PENDING, SENDING

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 100


@dataclass(frozen=True, slots=True)
class StatusChange:
    status: str
    reason: str
    at: datetime


@dataclass(frozen=True, slots=True)
class MessageRecord:
    message_id: str
    idempotency_key: str
    profile_id: str
    trigger_id: str
    channel: str
    template_id: str
    status: str
    reason: str
    recipient: str
    subject: str
    created_at: datetime
    seq: int = 0
    history: tuple[StatusChange, ...] = field(default_factory=tuple)

    @property
    def public_status(self) -> str:
        """`sending` is an internal step; callers see the message as pending."""
        return PENDING if self.status == SENDING else self.status


def page_size(requested: int) -> int:
    """0 means the default; larger than the maximum is clamped; negative is invalid."""
    if requested < 0:
        raise InvalidArgument(FieldViolation("page_size", "must not be negative"))
    return DEFAULT_PAGE_SIZE if requested == 0 else min(requested, MAX_PAGE_SIZE)


def encode_page_token(last_seq: int, profile_id: str) -> str:
    body = json.dumps({"before": last_seq, "profile": profile_id}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(body).decode().rstrip("=")


def decode_page_token(token: str, profile_id: str) -> int | None:
    """The position to continue before, or None for the first page.

    A token only continues the listing it came from (the same profile filter).
    """
    if not token:
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        before = data["before"]
        same_query = data["profile"] == profile_id
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise InvalidArgument(FieldViolation("page_token", "is not a token this service issued")) from None
    if not isinstance(before, int) or isinstance(before, bool) or before < 0:
        raise InvalidArgument(FieldViolation("page_token", "is not a token this service issued"))
    if not same_query:
        raise InvalidArgument(FieldViolation("page_token", "belongs to a listing with another profile_id"))
    return before
