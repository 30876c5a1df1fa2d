"""Messages as the API shows them: status, reason and history; paging of ListMessages."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from relevans.kit.paging import PageSize, decode_page_token, refuse_other_listing
from services.delivery.domain.states import PENDING, SENDING

MESSAGE_PAGES = PageSize(default=50, maximum=100)


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
    # Attempts at sending it so far.
    attempts: int = 0
    seq: int = 0
    history: tuple[StatusChange, ...] = field(default_factory=tuple)
    # SMS: the segments the body was sent in (0 for other channels).
    sms_segments: int = 0
    # Sent by SendTest.
    test: bool = False
    # The template variant used ("" until one was picked).
    locale: str = ""

    @property
    def public_status(self) -> str:
        """`sending` is an internal step; callers see the message as pending."""
        return PENDING if self.status == SENDING else self.status


def page_before(token: str, profile_id: str) -> int | None:
    """The position a page continues before (the token is `encode_page_token(before=<seq>,
    profile=<profile_id>)`), or None for the first page. A token only continues the listing it came
    from (the same profile filter)."""
    data = decode_page_token(token, before=int, profile=str)
    if data is None:
        return None
    if data["profile"] != profile_id:
        raise refuse_other_listing("profile_id")
    before: int = data["before"]
    return before
