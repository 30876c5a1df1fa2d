"""Proto <-> domain conversions that more than one module of the profile service needs.

The consent conversions serve the profile servicer and the outbox messages of
`services.profile.wire`.
"""

from __future__ import annotations

from relevans.common.v1 import common_pb2
from relevans.kit.enums import enum_name, enum_value
from relevans.kit.proto import to_timestamp
from relevans.profile.v1 import profile_pb2
from services.profile.domain import Consent, ConsentInput


def consent_input(c: profile_pb2.ConsentInput) -> ConsentInput:
    return ConsentInput(
        purpose=enum_name(common_pb2.Purpose, c.purpose, "PURPOSE_"),
        channel=enum_name(common_pb2.Channel, c.channel, "CHANNEL_"),
        status=enum_name(common_pb2.ConsentStatus, c.status, "CONSENT_STATUS_"),
        source=c.source,
        evidence=c.evidence,
    )


def consent_proto(c: Consent) -> profile_pb2.Consent:
    return profile_pb2.Consent(
        purpose=enum_value(common_pb2.Purpose, c.purpose, "PURPOSE_"),
        channel=enum_value(common_pb2.Channel, c.channel, "CHANNEL_"),
        status=enum_value(common_pb2.ConsentStatus, c.status, "CONSENT_STATUS_"),
        source=c.source,
        update_time=to_timestamp(c.recorded_at),
    )
