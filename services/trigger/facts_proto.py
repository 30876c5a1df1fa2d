"""The profile an enriched event carries (`relevans.profile.v1.Profile`) -> the `ProfileView` a
trigger condition sees, with the event's properties as `event.<property>`.

Built only when a condition asks for the profile (`EventFacts.profile`): most triggers never look.
What it holds mirrors what the profile service's segments see (services/profile/domain/enrichment.py):
a counter's value is its count in its shortest window, traits are plain values by the kit's
Struct rules, consents are keyed by (purpose, channel) lower-case names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from typing import Any

from google.protobuf import struct_pb2

from relevans.common.v1 import common_pb2
from relevans.conditions import ProfileView
from relevans.kit.enums import enum_name
from relevans.kit.proto import from_timestamp, from_value
from relevans.profile.v1 import profile_pb2


def profile_view(profile: profile_pb2.Profile, properties: dict[str, object]) -> ProfileView:
    """What a trigger condition sees of an enriched event: its properties and the profile right after it.
    Traits, consents and last-seen times are decoded as a condition reads them (most read a trait
    or two, or nothing of these)."""
    shortest: dict[str, tuple[int, int]] = {}  # counter -> (window_days, count)
    for c in profile.counters:
        seen = shortest.get(c.name)
        if seen is None or c.window_days < seen[0]:
            shortest[c.name] = (c.window_days, c.count)
    return ProfileView(
        traits=_Traits(profile.traits),
        tags=frozenset(profile.tags),
        counters={name: float(count) for name, (_, count) in shortest.items()},
        score=profile.score,
        consents=_Built(lambda: _consents(profile)),
        last_seen=_Built(lambda: _last_seen(profile)),
        event=properties,
    )


class _Traits(Mapping[str, object]):
    """The profile's traits, each converted from its `Value` when first read."""

    __slots__ = ("_decoded", "_values")

    def __init__(self, values: Mapping[str, struct_pb2.Value]) -> None:
        self._values = values
        self._decoded: dict[str, object] = {}

    def __getitem__(self, name: str) -> object:
        try:
            return self._decoded[name]
        except KeyError:
            if name not in self._values:
                raise
        value = self._decoded[name] = from_value(self._values[name])
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


class _Built(Mapping[Any, Any]):
    """A mapping built on its first read."""

    __slots__ = ("_build", "_built")

    def __init__(self, build: Callable[[], Mapping[Any, Any]]) -> None:
        self._build = build
        self._built: Mapping[Any, Any] | None = None

    def _get(self) -> Mapping[Any, Any]:
        if self._built is None:
            self._built = self._build()
        return self._built

    def __getitem__(self, key: Any) -> Any:
        return self._get()[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())


def _consents(profile: profile_pb2.Profile) -> dict[tuple[str, str], str]:
    return {
        (
            enum_name(common_pb2.Purpose, c.purpose, "PURPOSE_"),
            enum_name(common_pb2.Channel, c.channel, "CHANNEL_"),
        ): enum_name(common_pb2.ConsentStatus, c.status, "CONSENT_STATUS_")
        for c in profile.consents
    }


def _last_seen(profile: profile_pb2.Profile) -> dict[str, datetime]:
    out: dict[str, datetime] = {}
    stamps = profile.last_seen
    for event_type in stamps:
        try:
            out[event_type] = from_timestamp(stamps[event_type])
        except (ValueError, OverflowError):  # a broken timestamp is no time: the field is missing
            continue
    return out
