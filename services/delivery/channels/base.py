"""The I/O half of the channel contract: building what goes over the wire, and sending it.

The pure half (address, limits, classifying failures, the final state) is the channel's
`Channel` in `services/delivery/domain/channels/`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, runtime_checkable

from services.delivery.domain import Send, SendOutcome


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message as the transport hands it over."""

    recipient: str
    # The whole message as it goes over the wire (for email: domain.channels.email.email_bytes).
    content: bytes
    # SMS: the segments the body goes out in (recorded on the message with its claim).
    sms_segments: int = 0


class Refused(ValueError):
    """Raised by `Transport.compose` for a message its channel will not send as rendered (an SMS
    over the segment limit): the message is suppressed with `reason`; no provider is asked."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@runtime_checkable
class Closing(Protocol):
    """A transport that keeps connections between batches (an HTTP session): closed on shutdown."""

    async def close(self) -> None: ...


class Handover(Protocol):
    """The worker's side of a transport's sends: what is claimed and what came of it, as it happens."""

    async def claim(self, index: int) -> bool:
        """Called right before the content of `messages[index]` goes over the wire, once nothing
        else can refuse it; returns when the claim (`sending`) is committed. False: do not send
        it (another worker has it, or the claim could not be written)."""
        ...

    def report(self, index: int, outcome: SendOutcome) -> None:
        """The outcome of `messages[index]`, as soon as it is known: after its claim, or instead
        of one when the message was refused or could not be handed over before its content."""
        ...


class Transport(Protocol):
    def compose(self, message_id: str, send: Send, now: datetime) -> Outgoing:
        """The message to hand over, built before it is claimed so nothing can fail mid-send;
        raises ValueError, TypeError or LookupError when it cannot be built."""
        ...

    async def send_many(self, messages: Sequence[Outgoing], handover: Handover) -> None:
        """Send each message, claiming it through `handover` right before its content goes out
        and reporting each outcome there (none for a message whose claim was refused); never
        raises for a message's failure. Each connection carries one message at a time, so at
        most as many are claimed and not yet reported as the transport has connections."""
        ...


@runtime_checkable
class KnowsWhatWentOut(Protocol):
    """A transport whose sends leave a trace it can read (the web channel's banners are rows):
    for a message a dead worker left `sending`, it says whether it went out, so the message ends
    `sent` or, never handed over, failed `outcome_unknown` without a doubt."""

    async def went_out(self, messages: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
        """The (tenant id, message id) pairs among `messages` that went out."""
        ...
