"""Proto <-> domain conversions that more than one module of the profile service needs.

`struct_to_dict` reads the Structs of the profile and segment services; the consent
conversions serve the profile servicer and the outbox messages of `services.profile.wire`.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import struct_pb2

from relevans.common.v1 import common_pb2
from relevans.kit.proto import from_value, to_timestamp
from relevans.profile.v1 import profile_pb2
from services.profile.domain import Consent, ConsentInput


def struct_to_dict(s: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as plain Python values (numbers stay floats, as JSON numbers in the Struct are)."""
    fields = s.fields  # by key: iterating items() costs upb a third more
    return {k: from_value(fields[k]) for k in fields}


def _enum_name(enum: Any, value: int, prefix: str) -> str:
    try:
        return str(enum.Name(value)).removeprefix(prefix).lower()
    except ValueError:
        return str(value)


def consent_input(c: profile_pb2.ConsentInput) -> ConsentInput:
    return ConsentInput(
        purpose=_enum_name(common_pb2.Purpose, c.purpose, "PURPOSE_"),
        channel=_enum_name(common_pb2.Channel, c.channel, "CHANNEL_"),
        status=_enum_name(common_pb2.ConsentStatus, c.status, "CONSENT_STATUS_"),
        source=c.source,
        evidence=c.evidence,
    )


def consent_proto(c: Consent) -> profile_pb2.Consent:
    return profile_pb2.Consent(
        purpose=common_pb2.Purpose.Value("PURPOSE_" + c.purpose.upper()),
        channel=common_pb2.Channel.Value("CHANNEL_" + c.channel.upper()),
        status=common_pb2.ConsentStatus.Value("CONSENT_STATUS_" + c.status.upper()),
        source=c.source,
        update_time=to_timestamp(c.recorded_at),
    )
