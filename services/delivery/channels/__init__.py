"""The transports of the registered channels (`services.delivery.domain.channels.CHANNELS`).

Each channel's transport is opened here from the settings; the worker refuses to start
when a registered channel has none.
"""

from __future__ import annotations

from relevans.kit.settings import Settings
from services.delivery.channels.base import Transport
from services.delivery.channels.email import SmtpTransport
from services.delivery.domain.channels.email import EmailChannel
from services.delivery.domain.tracking import LinkMaker


def open_transports(settings: Settings, links: LinkMaker | None = None) -> dict[str, Transport]:
    """One transport per registered channel, by channel name; `links` makes the tracked links of
    the messages that carry them."""
    return {
        EmailChannel.name: SmtpTransport(
            settings.smtp_host, settings.smtp_port, sender=settings.smtp_sender, links=links
        ),
    }
