"""The transports of the registered channels (`services.delivery.domain.channels.CHANNELS`).

Each channel's transport is opened here from the settings; the worker refuses to start
when a registered channel has none. Each channel's provider rate limit (messages per second
per process, 0 = unlimited) is read here too.
"""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine

from relevans.kit.clock import Clock, SystemClock
from relevans.kit.db import create_engine
from relevans.kit.settings import Settings
from services.delivery.channels.address_guard import AddressRules
from services.delivery.channels.base import Transport
from services.delivery.channels.email import SmtpTransport
from services.delivery.channels.sms import SmsTransport, TwilioProvider
from services.delivery.channels.webhook import WebhookNetwork, WebhookTransport
from services.delivery.domain.channels.email import EmailChannel
from services.delivery.domain.channels.sms import SmsChannel
from services.delivery.domain.channels.webhook import WebhookChannel
from services.delivery.domain.tracking import LinkMaker
from services.delivery.webhook_rows import WebhookRows


def open_transports(
    settings: Settings,
    *,
    engine: AsyncEngine | None = None,
    clock: Clock | None = None,
    webhook_network: WebhookNetwork | None = None,
    links: LinkMaker | None = None,
) -> dict[str, Transport]:
    """One transport per registered channel, by channel name. `engine` is the delivery
    database's (webhook endpoints are read there; by default an engine of its own);
    `webhook_network` the resolver and connector of webhooks (tests inject them); `links` makes
    the tracked links of the messages that carry them."""
    return {
        EmailChannel.name: SmtpTransport(
            settings.smtp_host,
            settings.smtp_port,
            sender=settings.smtp_sender,
            connections=settings.smtp_connections,
            links=links,
        ),
        WebhookChannel.name: WebhookTransport(
            WebhookRows(engine or create_engine(settings.database_url("delivery"), pool_size=2)),
            AddressRules.from_settings(settings),
            clock or SystemClock(),
            webhook_network,
        ),
        SmsChannel.name: SmsTransport(
            TwilioProvider(
                settings.sms_provider_url,
                settings.sms_account_sid,
                settings.sms_auth_token,
                settings.sms_sender,
            ),
            max_segments=settings.sms_max_segments,
            timeout_s=settings.sms_timeout,
        ),
    }


def rate_limits(settings: Settings) -> dict[str, float]:
    """Messages per second per channel name (0: unlimited) for one process: the settings' rates are
    the service's, shared evenly by its processes (RELEVANS_DELIVERY_PROCESSES)."""
    share = settings.processes("delivery")
    return {
        EmailChannel.name: settings.smtp_rate_limit / share,
        SmsChannel.name: settings.sms_rate_limit / share,
        WebhookChannel.name: settings.webhook_rate_limit / share,
    }
