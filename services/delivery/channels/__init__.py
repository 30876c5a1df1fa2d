"""The transports of the registered channels (`services.delivery.domain.channels.CHANNELS`).

Each channel's transport is opened here from the settings; the worker refuses to start
when a registered channel has none.
"""

from __future__ import annotations

from relevans.kit.settings import Settings
from services.delivery.channels.base import Transport
from services.delivery.channels.email import SmtpTransport
from services.delivery.channels.sms import SmsTransport, TwilioProvider
from services.delivery.domain.channels.email import EmailChannel
from services.delivery.domain.channels.sms import SmsChannel


def open_transports(settings: Settings) -> dict[str, Transport]:
    """One transport per registered channel, by channel name."""
    return {
        EmailChannel.name: SmtpTransport(settings.smtp_host, settings.smtp_port, sender=settings.smtp_sender),
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
