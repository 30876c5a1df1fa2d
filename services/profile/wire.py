"""The bytes of the messages the profile service writes to its outbox.

EnrichedEvent, one per ingested event, is encoded by hand from serialized parts: this is the
hot path of ingest (see `enriched_events`). So is TraitsChanged, one per profile an import
creates with traits (see `traits_changed`). ConsentChanged and ProfileMerged are rare and
built as messages.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from google.protobuf import struct_pb2

from relevans.kit.bus import event_subject
from relevans.kit.proto import SMALL_VARINTS, timestamp_parts, to_value, varint
from relevans.profile.v1 import bus_pb2, profile_pb2
from services.profile.domain import Consent, Event, ProfileState
from services.profile.domain.ids import time_ordered_ids
from services.profile.domain.traits import TraitChange
from services.profile.servicers.conversions import consent_proto
from services.profile.store import EventMessages


def consent_changed(tenant: str, profile_id: str, consent: Consent) -> bytes:
    return bus_pb2.ConsentChanged(
        tenant_id=tenant, profile_id=profile_id, consent=consent_proto(consent)
    ).SerializeToString()


def profile_merged(tenant: str, surviving_id: str, merged_id: str, at: datetime, reason: str) -> bytes:
    msg = bus_pb2.ProfileMerged(
        tenant_id=tenant, surviving_profile_id=surviving_id, merged_profile_id=merged_id, reason=reason
    )
    msg.merge_time.FromDatetime(at)
    return msg.SerializeToString()


def _field(tag: bytes, payload: bytes) -> bytes:
    """One length-delimited protobuf field: its tag byte, the payload's length, the payload."""
    return tag + varint(len(payload)) + payload


def _tag(message: Any, name: str, wire_type: int = 2) -> bytes:
    """The tag byte of a field (field number << 3 | wire type; 2 is length-delimited)."""
    number = message.DESCRIPTOR.fields_by_name[name].number
    assert number < 16, "a one-byte tag"
    return bytes((number << 3 | wire_type,))


_EE = bus_pb2.EnrichedEvent
_TENANT_ID, _EVENT_ID, _PROFILE_ID = _tag(_EE, "tenant_id"), _tag(_EE, "event_id"), _tag(_EE, "profile_id")
_EVENT, _RECEIVE_TIME, _PROFILE = _tag(_EE, "event"), _tag(_EE, "receive_time"), _tag(_EE, "profile")
_MESSAGE_ID, _TIMESTAMP = _tag(profile_pb2.Event, "message_id"), _tag(profile_pb2.Event, "timestamp")
_P = profile_pb2.Profile
_P_PROFILE_ID, _P_CUSTOMER_ID, _P_EMAIL = _tag(_P, "profile_id"), _tag(_P, "customer_id"), _tag(_P, "email")
_P_FIRST_NAME, _P_CONSENTS, _P_TRAITS = _tag(_P, "first_name"), _tag(_P, "consents"), _tag(_P, "traits")
_P_TAGS, _P_COUNTERS, _P_LAST_SEEN = _tag(_P, "tags"), _tag(_P, "counters"), _tag(_P, "last_seen")
_P_SCORE = _tag(_P, "score", wire_type=1)
_KEY, _VALUE = b"\x0a", b"\x12"  # a map entry's key (1) and value (2)
_C = profile_pb2.CounterValue
_C_NAME, _C_WINDOW, _C_COUNT = _tag(_C, "name"), _tag(_C, "window_days", 0), _tag(_C, "count", 0)
_SECONDS, _NANOS = b"\x08", b"\x10"  # google.protobuf.Timestamp's two varint fields
_DOUBLE = struct.Struct("<d")


def _timestamp_bytes(value: datetime) -> bytes:
    """The encoded google.protobuf.Timestamp of a datetime (as `to_timestamp` builds it)."""
    seconds, nanos = timestamp_parts(value)
    return (_SECONDS + varint(seconds) if seconds else b"") + (_NANOS + varint(nanos) if nanos else b"")


@functools.lru_cache(maxsize=4096)
def _map_key(key: str) -> bytes:
    """A map entry's encoded key (event types and trait names recur in every batch)."""
    return _field(_KEY, key.encode())


def snapshot_bytes(s: ProfileState) -> bytes:
    """The encoded Profile an EnrichedEvent carries: identity, consents (by purpose and channel)
    and, once ingest has set it, the enriched part. Encoded field by field, which is cheaper
    than building the message: this runs for every profile of every batch (figures: bench/README.md)."""
    parts = [_field(_P_PROFILE_ID, s.profile_id.encode())]
    for tag, text in ((_P_CUSTOMER_ID, s.customer_id), (_P_EMAIL, s.email), (_P_FIRST_NAME, s.first_name)):
        if text:
            parts.append(_field(tag, text.encode()))
    for c in sorted(s.consents, key=lambda c: c.key):
        parts.append(_field(_P_CONSENTS, consent_proto(c).SerializeToString()))
    e = s.enriched
    if e is not None:
        for name, value in e.traits.items():
            entry = _map_key(name) + _field(_VALUE, to_value(value).SerializeToString())
            parts.append(_field(_P_TRAITS, entry))
        parts += [_field(_P_TAGS, tag.encode()) for tag in e.tags]
        for name, window, count in e.counters:
            counter = _field(_C_NAME, name.encode()) + _C_WINDOW + varint(window) + _C_COUNT + varint(count)
            parts.append(_field(_P_COUNTERS, counter))
        if e.score:
            parts.append(_P_SCORE + _DOUBLE.pack(e.score))
        for event_type, at in e.last_seen.items():
            ts = _timestamp_bytes(at)  # under 128 bytes: its length is one byte
            parts.append(_field(_P_LAST_SEEN, _map_key(event_type) + _VALUE + SMALL_VARINTS[len(ts)] + ts))
    return b"".join(parts)


def normalized_event(src: profile_pb2.Event, e: Event, now_field: bytes | None = None) -> bytes:
    """The serialized event as stored: normalised email, generated message_id, defaulted timestamp.

    Fields the client left unset are appended to the client's own encoding (protobuf reads
    fields in any order); `now_field` is the encoded timestamp field for events without one.
    """
    if e.email is None or src.email == e.email:  # no email, or sent normalised
        body = src.SerializeToString()
    else:
        copy = profile_pb2.Event()
        copy.CopyFrom(src)
        copy.email = e.email
        body = copy.SerializeToString()
    if not src.message_id:
        body += _field(_MESSAGE_ID, e.message_id.encode())
    if not src.HasField("timestamp"):
        body += now_field or _field(_TIMESTAMP, _timestamp_bytes(e.timestamp))
    return body


def enriched_events(
    tenant: str,
    protos: Sequence[profile_pb2.Event],
    events: Sequence[Event],
    receive_time: datetime,
    partitions: int,
) -> EventMessages:
    """Builds the EnrichedEvent outbox messages of a batch once the store knows the events' ids
    and profiles.

    The hot path of ingest: each message is assembled from serialized parts (the encoding
    protobuf defines for a message is the concatenation of its fields), so the tenant, the
    receive time and each profile snapshot are encoded once per batch, not once per event.
    """
    head = _field(_TENANT_ID, tenant.encode())
    received = _field(_RECEIVE_TIME, _timestamp_bytes(receive_time))
    now_field = _field(_TIMESTAMP, _timestamp_bytes(receive_time))

    def build(
        positions: Sequence[int], event_ids: Sequence[str], states: Sequence[ProfileState]
    ) -> tuple[list[str], list[bytes]]:
        # a profile's subject and encoded part, by the state object (one per profile per batch)
        profiles: dict[int, tuple[str, bytes]] = {}
        subjects: list[str] = []
        payloads: list[bytes] = []
        for i, event_id, state in zip(positions, event_ids, states, strict=True):
            profile = profiles.get(id(state))
            if profile is None:
                part = _field(_PROFILE_ID, state.profile_id.encode()) + received
                part += _field(_PROFILE, snapshot_bytes(state))
                profile = profiles[id(state)] = (event_subject(tenant, state.profile_id, partitions), part)
            e = events[i]
            body = normalized_event(protos[i], e, now_field if e.timestamp is receive_time else None)
            subjects.append(profile[0])
            payloads.append(
                b"".join((head, _field(_EVENT_ID, event_id.encode()), _field(_EVENT, body), profile[1]))
            )
        return subjects, payloads

    return build


_TC = bus_pb2.TraitsChanged
_TC_TENANT_ID, _TC_PROFILE_ID = _tag(_TC, "tenant_id"), _tag(_TC, "profile_id")
_TC_TRAITS, _TC_PREVIOUS, _TC_CHANGED = _tag(_TC, "traits"), _tag(_TC, "previous"), _tag(_TC, "changed")
_TC_TIME, _TC_SOURCE, _TC_CHANGE_ID = _tag(_TC, "change_time"), _tag(_TC, "source"), _tag(_TC, "change_id")
_STRING_VALUE = _tag(struct_pb2.Value, "string_value")


def _value_bytes(value: object) -> bytes:
    """The encoded Value of a trait value, as `to_value` makes it (a string, the common case, directly)."""
    if isinstance(value, str):
        return _field(_STRING_VALUE, value.encode())
    return to_value(value).SerializeToString()


def _trait_entries(tag: bytes, traits: Mapping[str, object]) -> list[bytes]:
    """The encoded entries of a map<string, Value> field."""
    return [_field(tag, _map_key(name) + _field(_VALUE, _value_bytes(v))) for name, v in traits.items()]


def traits_changed(tenant: str, changes: Sequence[TraitChange], at: datetime, source: str) -> list[bytes]:
    """A TraitsChanged payload per change, each with a change_id of its own (a time-ordered UUID).
    Encoded from parts, as `enriched_events` is: an import makes one for every profile it
    creates with traits."""
    head = _field(_TC_TENANT_ID, tenant.encode())
    tail = _field(_TC_TIME, _timestamp_bytes(at)) + _field(_TC_SOURCE, source.encode())
    make_id = time_ordered_ids(at)
    payloads: list[bytes] = []
    for c in changes:
        parts = [head, _field(_TC_PROFILE_ID, c.profile_id.encode())]
        parts += _trait_entries(_TC_TRAITS, c.traits)
        parts += _trait_entries(_TC_PREVIOUS, c.previous)
        parts += [_field(_TC_CHANGED, name.encode()) for name in c.changed]
        parts += (tail, _field(_TC_CHANGE_ID, make_id().encode()))
        payloads.append(b"".join(parts))
    return payloads
