"""The channels delivery sends on, registered here and nowhere else.

A channel is its rules here (a `Channel`, pure) and its transport in
`services/delivery/channels/` (the sending); the service refuses to start when a
registered channel has no transport. Templates and requests for any other channel
are refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from services.delivery.domain.channels.base import (
    INVALID_ADDRESS,
    NO_ADDRESS,
    Channel,
    OutcomeKind,
    SendFailure,
    SendOutcome,
)
from services.delivery.domain.channels.email import EmailChannel
from services.delivery.domain.channels.sms import SmsChannel
from services.delivery.domain.channels.web import WebChannel
from services.delivery.domain.channels.webhook import WebhookChannel

CHANNELS: Mapping[str, Channel] = MappingProxyType(
    {c.name: c for c in (EmailChannel(), SmsChannel(), WebChannel(), WebhookChannel())}
)
SUPPORTED_CHANNELS = frozenset(CHANNELS)

__all__ = [
    "CHANNELS",
    "INVALID_ADDRESS",
    "NO_ADDRESS",
    "SUPPORTED_CHANNELS",
    "Channel",
    "OutcomeKind",
    "SendFailure",
    "SendOutcome",
]
