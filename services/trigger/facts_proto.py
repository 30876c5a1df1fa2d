"""The profile an enriched event carries (`relevans.profile.v1.Profile`) -> the `ProfileView` a
trigger condition sees, with the event's properties as `event.<property>`.

Built only when a condition asks for the profile (`EventFacts.profile`): most triggers never look.
What it holds mirrors what the profile service's segments see (services/profile/domain/enrichment.py):
a counter's value is its count in its shortest window, traits are plain values by the kit's
Struct rules, consents are keyed by (purpose, channel) lower-case names.
"""

from __future__ import annotations

from datetime import datetime

from relevans.common.v1 import common_pb2
from relevans.conditions import ProfileView
from relevans.kit.enums import enum_name
from relevans.kit.proto import from_timestamp, from_value
from relevans.profile.v1 import profile_pb2


def profile_view(profile: profile_pb2.Profile, properties: dict[str, object]) -> ProfileView:
    """What a trigger condition sees of an enriched event: its properties and the profile right after it."""
    shortest: dict[str, tuple[int, int]] = {}  # counter -> (window_days, count)
    for c in profile.counters:
        seen = shortest.get(c.name)
        if seen is None or c.window_days < seen[0]:
            shortest[c.name] = (c.window_days, c.count)
    traits = profile.traits
    return ProfileView(
        traits={name: from_value(traits[name]) for name in traits},
        tags=frozenset(profile.tags),
        counters={name: float(count) for name, (_, count) in shortest.items()},
        score=profile.score,
        consents={
            (
                enum_name(common_pb2.Purpose, c.purpose, "PURPOSE_"),
                enum_name(common_pb2.Channel, c.channel, "CHANNEL_"),
            ): enum_name(common_pb2.ConsentStatus, c.status, "CONSENT_STATUS_")
            for c in profile.consents
        },
        last_seen=_last_seen(profile),
        event=properties,
    )


def _last_seen(profile: profile_pb2.Profile) -> dict[str, datetime]:
    out: dict[str, datetime] = {}
    stamps = profile.last_seen
    for event_type in stamps:
        try:
            out[event_type] = from_timestamp(stamps[event_type])
        except (ValueError, OverflowError):  # a broken timestamp is no time: the field is missing
            continue
    return out
