"""The I/O half of the channel contract: building what goes over the wire, and sending it.

The pure half (address, limits, classifying failures, the final state) is the channel's
`Channel` in `services/delivery/domain/channels/`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from services.delivery.domain import Send, SendOutcome


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message as the transport hands it over."""

    recipient: str
    # The whole message as it goes over the wire (for email: domain.channels.email.email_bytes).
    content: bytes


class Transport(Protocol):
    def compose(self, message_id: str, send: Send, now: datetime) -> Outgoing:
        """The message to hand over, built before it is claimed so nothing can fail mid-send;
        raises ValueError, TypeError or LookupError when it cannot be built."""
        ...

    async def send_many(self, messages: Sequence[Outgoing]) -> list[SendOutcome]:
        """One outcome per message, in order; never raises for a message's failure."""
        ...
