"""The gRPC face of the profile service: proto -> domain -> store -> proto, nothing more."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import struct
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import grpc
from google.protobuf import struct_pb2

from relevans.common.v1 import common_pb2
from relevans.kit.bus import event_subject
from relevans.kit.clock import Clock
from relevans.kit.errors import NotFound
from relevans.kit.proto import from_timestamp, from_value, timestamp_parts, to_timestamp, to_value
from relevans.kit.server import ServiceBinding, principal
from relevans.profile.v1 import bus_pb2, profile_pb2, profile_pb2_grpc
from services.profile.domain import (
    Consent,
    ConsentInput,
    Event,
    Profile,
    ProfileState,
    RawEvent,
    RawIdentify,
    validate_batch,
    validate_event,
    validate_identify,
    validate_lookup,
    validate_profile_ids,
    validate_set_consent,
)
from services.profile.domain.identity import Enriched, new_profile_id
from services.profile.domain.ids import random_uuid, time_ordered_ids
from services.profile.domain.imports import (
    MAX_REPORTED_ERRORS,
    ImportRow,
    RawImportRow,
    validate_batch_size,
    validate_rows,
    validate_source,
)
from services.profile.domain.merge import validate_merge_request
from services.profile.domain.profiles import DEFAULT_FIELDS, PROFILE_FIELDS, TraitValue, validate_read_mask
from services.profile.domain.traits import validate_set_traits
from services.profile.store import EventMessages, ImportInFlight, ImportResult, ProfileStore, TrackResult
from services.profile.store.gdpr import CONSENT_NOT_RESTORED, Erasure, Export, GdprStore, validate_erase

SERVICE_NAME = "relevans.profile.v1.ProfileService"
SCOPES = {
    "Track": "ingest",
    "BatchTrack": "ingest",
    "Identify": "ingest",
    "SetConsent": "ingest",
    "GetProfile": "read",
    "BatchGetProfiles": "read",
    "ImportProfiles": "ingest",
    "SetTraits": "ingest",
    "MergeProfiles": "admin",
    # personal data of one person, and its erasure
    "ExportProfile": "admin",
    "EraseProfile": "admin",
    "GetErasure": "admin",
}

Context = grpc.aio.ServicerContext[Any, Any]

# ---- proto <-> domain -------------------------------------------------------------------------


def struct_to_dict(s: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as plain Python values (numbers stay floats, as JSON numbers in the Struct are)."""
    fields = s.fields  # by key: iterating items() costs upb a third more
    return {k: from_value(fields[k]) for k in fields}


def raw_event(e: profile_pb2.Event) -> RawEvent:
    timestamp: datetime | None = None
    bad = False
    if e.HasField("timestamp"):
        try:
            timestamp = from_timestamp(e.timestamp)
        except (ValueError, OverflowError):
            bad = True
    return RawEvent(  # positional: this runs for every ingested event
        e.type,
        e.message_id,
        timestamp,
        bad,
        e.anonymous_id,
        e.customer_id,
        e.email,
        struct_to_dict(e.properties) if e.HasField("properties") else {},
    )


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


ALL_FIELDS = frozenset(PROFILE_FIELDS)


def enriched_fields(e: Enriched) -> dict[str, Any]:
    """The Profile message fields of a profile's enriched part."""
    return {
        "traits": {k: to_value(v) for k, v in e.traits.items()},
        "tags": e.tags,
        "counters": [profile_pb2.CounterValue(name=n, window_days=w, count=c) for n, w, c in e.counters],
        "score": e.score,
        "last_seen": {t: to_timestamp(at) for t, at in e.last_seen.items()},
    }


def profile_proto(p: Profile, fields: frozenset[str] = DEFAULT_FIELDS) -> profile_pb2.Profile:
    """The Profile message with `fields` set (see domain.profiles.validate_read_mask)."""
    message = profile_pb2.Profile(
        profile_id=p.profile_id,
        customer_id=p.customer_id or "",
        email=p.email or "",
        first_name=p.first_name or "",
        anonymous_ids=p.anonymous_ids,
        consents=[consent_proto(c) for c in p.consents],
        create_time=to_timestamp(p.created_at),
        update_time=to_timestamp(p.updated_at),
        last_seen_time=to_timestamp(p.last_seen_at),
        trait_sources=[trait_proto(t) for t in p.trait_sources],
        **enriched_fields(p.enriched),
    )
    for name in PROFILE_FIELDS:
        if name not in fields:
            message.ClearField(name)  # type: ignore[arg-type]
    return message


def trait_proto(t: TraitValue) -> profile_pb2.Trait:
    return profile_pb2.Trait(
        name=t.name, source=t.source, value=to_value(t.value), update_time=to_timestamp(t.updated_at)
    )


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


_SMALL = [bytes((n,)) for n in range(0x80)]


def _varint(n: int) -> bytes:
    if 0 <= n < 0x80:
        return _SMALL[n]
    if 0x1000_0000 <= n < 0x8_0000_0000:  # five bytes: the seconds (and most nanos) of a Timestamp
        return bytes(
            (n & 0x7F | 0x80, n >> 7 & 0x7F | 0x80, n >> 14 & 0x7F | 0x80, n >> 21 & 0x7F | 0x80, n >> 28)
        )
    n &= 0xFFFF_FFFF_FFFF_FFFF  # a negative int64 is written as its 64-bit two's complement
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """One length-delimited protobuf field: its tag byte, the payload's length, the payload."""
    return tag + _varint(len(payload)) + payload


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
    return (_SECONDS + _varint(seconds) if seconds else b"") + (_NANOS + _varint(nanos) if nanos else b"")


@functools.lru_cache(maxsize=4096)
def _map_key(key: str) -> bytes:
    """A map entry's encoded key (event types and trait names recur in every batch)."""
    return _field(_KEY, key.encode())


def snapshot_bytes(s: ProfileState) -> bytes:
    """The encoded Profile an EnrichedEvent carries: identity, consents (by purpose and channel)
    and, once ingest has set it, the enriched part. Encoded field by field, a quarter cheaper
    than building the message: this runs for every profile of every batch."""
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
            counter = _field(_C_NAME, name.encode()) + _C_WINDOW + _varint(window) + _C_COUNT + _varint(count)
            parts.append(_field(_P_COUNTERS, counter))
        if e.score:
            parts.append(_P_SCORE + _DOUBLE.pack(e.score))
        for event_type, at in e.last_seen.items():
            ts = _timestamp_bytes(at)  # under 128 bytes: its length is one byte
            parts.append(_field(_P_LAST_SEEN, _map_key(event_type) + _VALUE + _SMALL[len(ts)] + ts))
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


# consent_input of the few consent answers an import's rows carry (ConsentInput is immutable)
_IMPORT_CONSENTS: dict[tuple[int, int, int, str, str], ConsentInput] = {}


def _import_consent(c: profile_pb2.ConsentInput) -> ConsentInput:
    key = (c.purpose, c.channel, c.status, c.source, c.evidence)
    known = _IMPORT_CONSENTS.get(key)
    if known is None:
        if len(_IMPORT_CONSENTS) >= 1024:
            _IMPORT_CONSENTS.clear()
        known = _IMPORT_CONSENTS[key] = consent_input(c)
    return known


def raw_import_row(r: profile_pb2.ImportRow) -> RawImportRow:
    return RawImportRow(
        row_number=r.row_number,
        customer_id=r.customer_id,
        email=r.email,
        first_name=r.first_name,
        last_name=r.last_name,
        phone=r.phone,
        tags=tuple(r.tags),
        traits=dict(r.traits),
        consent=_import_consent(r.marketing_email_consent) if r.HasField("marketing_email_consent") else None,
    )


# At most this many messages of one import are validated and being written at a time.
MAX_IMPORT_WRITES = 3


async def _succeeded(write: asyncio.Task[ImportResult]) -> None:
    """Wait for an earlier message's write; fail (and so roll back) if it failed."""
    await asyncio.wait((write,))
    if write.cancelled() or write.exception() is not None:
        raise RuntimeError("an earlier message of the import was not written")


# ---- the service ------------------------------------------------------------------------------


@dataclass(slots=True)
class _Waiting:
    proto: profile_pb2.Event
    event: Event
    result: asyncio.Future[TrackResult]


class TrackCoalescer:
    """Writes concurrent single-event `Track` calls of a tenant in shared transactions.

    A call never waits for a timer: while fewer than `max_writes` writes run, its event is
    written at once; otherwise it joins the events queued behind the running writes, and the
    next free writer takes them all in one transaction (up to `max_batch`). Under load this
    turns many small transactions (each a commit, each an outbox relay round) into a few larger
    ones. One writer is the default: measured with bench/track.py it costs the service and
    PostgreSQL ~25 % less CPU per event than two (batches are larger), with no worse latency.
    Idempotency is unchanged: concurrent calls with one message_id store one event and
    the others get `duplicate`. A write that fails fails every call in it, and stores none.
    """

    def __init__(
        self,
        store: ProfileStore,
        clock: Clock,
        *,
        event_partitions: int,
        notify: Callable[[], None],
        max_writes: int = 1,
        max_batch: int = 500,
    ) -> None:
        self.store = store
        self.clock = clock
        self.event_partitions = event_partitions
        self.notify = notify
        self.max_writes = max_writes
        self.max_batch = max_batch
        self._queues: dict[str, list[_Waiting]] = {}
        self._writers = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def track(self, tenant: str, proto: profile_pb2.Event, event: Event) -> TrackResult:
        result: asyncio.Future[TrackResult] = asyncio.get_running_loop().create_future()
        self._queues.setdefault(tenant, []).append(_Waiting(proto, event, result))
        if self._writers < self.max_writes:
            self._writers += 1
            # A fresh context: the writer serves many calls, not the one that happened to start it.
            task = asyncio.create_task(self._write_all(), context=contextvars.Context())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await result

    async def _write_all(self) -> None:
        try:
            while self._queues:
                tenant, waiting = next(iter(self._queues.items()))
                if len(waiting) > self.max_batch:
                    self._queues[tenant] = waiting[self.max_batch :]
                    waiting = waiting[: self.max_batch]
                else:
                    del self._queues[tenant]
                await self._write(tenant, waiting)
        finally:
            self._writers -= 1

    async def _write(self, tenant: str, waiting: list[_Waiting]) -> None:
        now = self.clock.now()
        events = [w.event for w in waiting]
        try:
            results = await self.store.track(
                tenant,
                events,
                now,
                enriched_events(tenant, [w.proto for w in waiting], events, now, self.event_partitions),
                make_id=time_ordered_ids(now),
            )
        except BaseException as exc:
            failure = exc if isinstance(exc, Exception) else RuntimeError("the write was cancelled")
            for w in waiting:
                if not w.result.done():
                    w.result.set_exception(failure)
            if not isinstance(exc, Exception):
                raise
            return
        for w, r in zip(waiting, results, strict=True):
            if not w.result.done():  # the caller may have gone; its event is stored all the same
                w.result.set_result(r)
        if not all(r.duplicate for r in results):
            self.notify()


class ProfileServicer(profile_pb2_grpc.ProfileServiceServicer):
    def __init__(
        self,
        store: ProfileStore,
        clock: Clock,
        *,
        event_partitions: int,
        notify: Callable[[], None],
    ) -> None:
        self.store = store
        self.clock = clock
        self.event_partitions = event_partitions
        self.notify = notify
        self.tracks = TrackCoalescer(store, clock, event_partitions=event_partitions, notify=notify)
        self.gdpr = GdprStore(store.engine)

    async def Track(self, request: profile_pb2.TrackRequest, context: Context) -> profile_pb2.TrackResponse:
        tenant = principal().tenant_id
        event = validate_event(raw_event(request.event), self.clock.now())
        result = await self.tracks.track(tenant, request.event, event)
        return profile_pb2.TrackResponse(
            event_id=result.event_id, profile_id=result.profile_id, duplicate=result.duplicate
        )

    async def BatchTrack(
        self, request: profile_pb2.BatchTrackRequest, context: Context
    ) -> profile_pb2.BatchTrackResponse:
        tenant = principal().tenant_id
        now = self.clock.now()
        protos = list(request.events)
        events = validate_batch([raw_event(e) for e in protos], now)
        if not events:
            return profile_pb2.BatchTrackResponse()
        results = await self.store.track(
            tenant,
            events,
            now,
            enriched_events(tenant, protos, events, now, self.event_partitions),
            make_id=time_ordered_ids(now),
        )
        if not all(r.duplicate for r in results):
            self.notify()
        response = profile_pb2.BatchTrackResponse()
        add = response.results.add  # built in place: half the cost of building each, then copying
        for r in results:
            add(event_id=r.event_id, profile_id=r.profile_id, duplicate=r.duplicate)
        return response

    async def Identify(
        self, request: profile_pb2.IdentifyRequest, context: Context
    ) -> profile_pb2.IdentifyResponse:
        tenant = principal().tenant_id
        now = self.clock.now()
        command = validate_identify(
            RawIdentify(
                customer_id=request.customer_id,
                email=request.email,
                anonymous_id=request.anonymous_id,
                first_name=request.first_name,
                consents=tuple(consent_input(c) for c in request.consents),
                traits=struct_to_dict(request.traits),
            ),
            now,
        )
        profile, created = await self.store.identify(tenant, command, now, make_profile_id=new_profile_id)
        self.notify()
        return profile_pb2.IdentifyResponse(profile=profile_proto(profile), created=created)

    async def SetConsent(
        self, request: profile_pb2.SetConsentRequest, context: Context
    ) -> profile_pb2.SetConsentResponse:
        tenant = principal().tenant_id
        now = self.clock.now()
        consent = validate_set_consent(request.profile_id, consent_input(request.consent), now)
        profile = await self.store.set_consent(tenant, request.profile_id, consent, now)
        self.notify()
        return profile_pb2.SetConsentResponse(profile=profile_proto(profile))

    async def GetProfile(
        self, request: profile_pb2.GetProfileRequest, context: Context
    ) -> profile_pb2.GetProfileResponse:
        tenant = principal().tenant_id
        lookup = validate_lookup(request.profile_id, request.customer_id, request.email)
        fields = validate_read_mask(list(request.read_mask.paths))
        profile = await self.store.find_profile(
            tenant, lookup, self.clock.now(), trait_sources="trait_sources" in fields
        )
        return profile_pb2.GetProfileResponse(profile=profile_proto(profile, fields))

    async def BatchGetProfiles(
        self, request: profile_pb2.BatchGetProfilesRequest, context: Context
    ) -> profile_pb2.BatchGetProfilesResponse:
        tenant = principal().tenant_id
        ids = validate_profile_ids(list(request.profile_ids))
        merged: dict[str, str] = {}
        found = await self.store.get_profiles(tenant, ids, self.clock.now(), merged=merged)
        return profile_pb2.BatchGetProfilesResponse(
            profiles=[profile_proto(p) for p in found], merged_profile_ids=merged
        )

    async def SetTraits(
        self, request: profile_pb2.SetTraitsRequest, context: Context
    ) -> profile_pb2.SetTraitsResponse:
        tenant = principal().tenant_id
        traits = validate_set_traits(request.profile_id, request.source, struct_to_dict(request.traits))
        profile = await self.store.set_traits(
            tenant, request.profile_id, request.source, traits, self.clock.now()
        )
        return profile_pb2.SetTraitsResponse(profile=profile_proto(profile, ALL_FIELDS))

    async def MergeProfiles(
        self, request: profile_pb2.MergeProfilesRequest, context: Context
    ) -> profile_pb2.MergeProfilesResponse:
        tenant = principal().tenant_id
        validate_merge_request(request.profile_id, request.other_profile_id)
        profile, merged = await self.store.merge_profiles(
            tenant, request.profile_id, request.other_profile_id, self.clock.now()
        )
        if merged is not None:
            self.notify()
        return profile_pb2.MergeProfilesResponse(
            profile=profile_proto(profile), merged_profile_id=merged or ""
        )

    async def ImportProfiles(
        self, request_iterator: AsyncIterator[profile_pb2.ImportProfilesRequest], context: Context
    ) -> profile_pb2.ImportProfilesResponse:
        """Each message's valid rows are written in one transaction; bad rows are reported (the
        first MAX_REPORTED_ERRORS of them) and counted. Writes overlap: the next message is read
        and validated while one is written, and its write starts as soon as the one before holds
        its profiles (`ProfileStore.import_rows`), so a person in both lands as the later one
        says; messages commit in order. A message that fails ends the call; the messages before
        it stay imported, the ones after it do not."""
        tenant = principal().tenant_id
        response = profile_pb2.ImportProfilesResponse()
        source: str | None = None
        # Writes started and not yet counted, oldest first, each with its "claimed" event.
        writes: deque[tuple[asyncio.Task[ImportResult], asyncio.Event]] = deque()
        # What this import's uncommitted writes hold (see `ProfileStore.import_rows`).
        held = ImportInFlight()

        async def count_oldest() -> None:
            result = await writes.popleft()[0]
            response.rows_upserted += result.upserted
            response.profiles_created += result.profiles_created
            room = MAX_REPORTED_ERRORS - len(response.errors)
            response.errors.extend(
                profile_pb2.ImportRowError(
                    row_number=n, field="marketing_consent", reason=CONSENT_NOT_RESTORED
                )
                for n in result.consent_not_restored[: max(room, 0)]
            )
            if result.consents_recorded:
                self.notify()

        async def write(
            rows: list[ImportRow],
            now: datetime,
            previous: tuple[asyncio.Task[ImportResult], asyncio.Event] | None,
            claimed: asyncio.Event,
        ) -> ImportResult:
            """Write one message once the one before holds its profiles (or is done)."""
            before_commit = None
            if previous is not None:
                task, previous_claimed = previous
                claim = asyncio.create_task(previous_claimed.wait())
                try:
                    await asyncio.wait((task, claim), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    claim.cancel()
                if task.done():
                    await _succeeded(task)
                else:
                    before_commit = functools.partial(_succeeded, task)
            # time-ordered profile ids: a big import appends to the profile-keyed indexes
            # instead of writing all over them
            return await self.store.import_rows(
                tenant,
                rows,
                now,
                make_profile_id=time_ordered_ids(now),
                claimed=claimed.set,
                before_commit=before_commit,
                held=held,
            )

        try:
            async for request in request_iterator:
                if source is None:
                    source = validate_source(request.source)
                validate_batch_size(len(request.rows))
                now = self.clock.now()
                rows, errors = validate_rows([raw_import_row(r) for r in request.rows], now, source)
                response.rows_received += len(request.rows)
                response.rows_failed += len(request.rows) - len(rows)
                room = MAX_REPORTED_ERRORS - len(response.errors)
                response.errors.extend(
                    profile_pb2.ImportRowError(row_number=e.row_number, field=e.field, reason=e.reason)
                    for e in errors[: max(room, 0)]
                )
                if len(writes) == MAX_IMPORT_WRITES:
                    await count_oldest()
                claimed = asyncio.Event()
                task = asyncio.create_task(write(rows, now, writes[-1] if writes else None, claimed))
                writes.append((task, claimed))
            while writes:
                await count_oldest()
        finally:
            if writes:
                # the call failed or went away: writes that started finish all the same
                await asyncio.gather(*(t for t, _ in writes), return_exceptions=True)
        return response

    async def ExportProfile(
        self, request: profile_pb2.ExportProfileRequest, context: Context
    ) -> profile_pb2.ExportProfileResponse:
        tenant = principal().tenant_id
        validate_erase(request.profile_id, "")
        export = await self.gdpr.export(tenant, request.profile_id)
        found = await self.store.get_profiles(tenant, [export.profile.profile_id], self.clock.now())
        if not found:  # erased meanwhile
            raise NotFound(f"profile {request.profile_id!r} not found")
        return export_proto(found[0], export)

    async def EraseProfile(
        self, request: profile_pb2.EraseProfileRequest, context: Context
    ) -> profile_pb2.EraseProfileResponse:
        tenant = principal().tenant_id
        validate_erase(request.profile_id, request.request_id)
        erasure = await self.gdpr.erase(
            tenant, request.profile_id, request.request_id, self.clock.now(), make_id=random_uuid
        )
        self.notify()
        return profile_pb2.EraseProfileResponse(erasure_id=erasure.erasure_id, state=erasure_state(erasure))

    async def GetErasure(
        self, request: profile_pb2.GetErasureRequest, context: Context
    ) -> profile_pb2.GetErasureResponse:
        tenant = principal().tenant_id
        e = await self.gdpr.get_erasure(tenant, request.erasure_id)
        response = profile_pb2.GetErasureResponse(
            erasure_id=e.erasure_id,
            state=erasure_state(e),
            profile_id=e.profile_id,
            services_done=e.services_done,
            request_time=to_timestamp(e.requested_at),
            complete_time=to_timestamp(e.completed_at),
        )
        return response


def erasure_state(e: Erasure) -> profile_pb2.ErasureState.ValueType:
    return profile_pb2.ERASURE_STATE_DONE if e.state == "done" else profile_pb2.ERASURE_STATE_PENDING


def _ledger_proto(r: Any) -> profile_pb2.ConsentLedgerEntry:
    return profile_pb2.ConsentLedgerEntry(
        purpose=common_pb2.Purpose.Value("PURPOSE_" + r.purpose.upper()),
        channel=common_pb2.Channel.Value("CHANNEL_" + r.channel.upper()),
        status=common_pb2.ConsentStatus.Value("CONSENT_STATUS_" + r.status.upper()),
        source=r.source,
        evidence=r.evidence,
        record_time=to_timestamp(r.recorded_at),
    )


def _event_proto(r: Any) -> profile_pb2.StoredEvent:
    properties = struct_pb2.Struct()
    properties.update(r.properties)
    return profile_pb2.StoredEvent(
        event_id=r.event_id,
        event=profile_pb2.Event(
            message_id=r.message_id,
            type=r.type,
            timestamp=to_timestamp(r.occurred_at),
            anonymous_id=r.anonymous_id or "",
            customer_id=r.customer_id or "",
            email=r.email or "",
            properties=properties,
        ),
        receive_time=to_timestamp(r.received_at),
    )


def export_proto(profile: Profile, e: Export) -> profile_pb2.ExportProfileResponse:
    return profile_pb2.ExportProfileResponse(
        profile=profile_proto(profile),
        last_name=e.profile.last_name or "",
        phone=e.profile.phone or "",
        identities=[
            profile_pb2.Identity(kind=i.kind, value=i.value, create_time=to_timestamp(i.created_at))
            for i in e.identities
        ],
        events=[_event_proto(r) for r in e.events],
        events_truncated=e.events_truncated,
        consent_history=[_ledger_proto(r) for r in e.consent_history],
        tags=e.tags,
        traits=[
            profile_pb2.Trait(
                name=t.name, source=t.source, value=to_value(t.value), update_time=to_timestamp(t.updated_at)
            )
            for t in e.traits
        ],
        merges=[
            profile_pb2.MergeRecord(
                from_profile_id=m.from_profile_id,
                to_profile_id=m.to_profile_id,
                anonymous_id=m.anonymous_id or "",
                source=m.source,
                merge_time=to_timestamp(m.merged_at),
            )
            for m in e.merges
        ],
    )


def binding(servicer: ProfileServicer) -> ServiceBinding:
    return ServiceBinding(
        full_name=SERVICE_NAME,
        register=profile_pb2_grpc.add_ProfileServiceServicer_to_server,
        servicer=servicer,
        scopes=SCOPES,
    )
