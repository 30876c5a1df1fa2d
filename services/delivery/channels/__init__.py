"""The transports of the registered channels (`services.delivery.domain.channels.CHANNELS`).

Each channel's transport is opened here from the settings; the worker refuses to start
when a registered channel has none. Each channel's provider rate limit (messages per second
per process, 0 = unlimited) is read here too.
"""

from __future__ import annotations

from relevans.kit.settings import Settings
from services.delivery.channels.base import Transport
from services.delivery.channels.email import SmtpTransport
from services.delivery.domain.channels.email import EmailChannel


def open_transports(settings: Settings) -> dict[str, Transport]:
    """One transport per registered channel, by channel name."""
    return {
        EmailChannel.name: SmtpTransport(settings.smtp_host, settings.smtp_port, sender=settings.smtp_sender),
    }


def rate_limits(settings: Settings) -> dict[str, float]:
    """Messages per second per channel name (0: unlimited)."""
    return {
        EmailChannel.name: settings.smtp_rate_limit,
    }
