"""The gRPC face of the profile service: proto -> domain -> store -> proto, nothing more."""

from __future__ import annotations

import asyncio
import functools
from collections import deque
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any

import grpc
from google.protobuf import struct_pb2

from relevans.common.v1 import common_pb2
from relevans.kit.clock import Clock
from relevans.kit.errors import NotFound, check_count
from relevans.kit.proto import UNSET, from_struct, from_timestamp, to_timestamp, to_value
from relevans.kit.server import ServiceBinding, principal
from relevans.profile.v1 import profile_pb2, profile_pb2_grpc
from services.profile.domain import (
    ConsentInput,
    Profile,
    RawEvent,
    RawIdentify,
    validate_batch,
    validate_event,
    validate_event_count,
    validate_identify,
    validate_lookup,
    validate_profile_ids,
    validate_set_consent,
)
from services.profile.domain.identity import MAX_IDENTIFY_CONSENTS, Enriched, new_profile_id
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
from services.profile.servicers.conversions import consent_input, consent_proto
from services.profile.store import ImportInFlight, ImportResult, ProfileStore
from services.profile.store.gdpr import CONSENT_NOT_RESTORED, Erasure, Export, GdprStore, validate_erase
from services.profile.track_batching import TrackCoalescer
from services.profile.wire import enriched_events

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
        from_struct(e.properties, UNSET) if e.HasField("properties") else {},
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
        phone=p.phone or "",
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


class _ImportWrites:
    """The overlapping writes of one `ImportProfiles` call, counted into its response in order."""

    def __init__(
        self,
        store: ProfileStore,
        tenant: str,
        response: profile_pb2.ImportProfilesResponse,
        notify: Callable[[], None],
    ) -> None:
        self.store = store
        self.tenant = tenant
        self.response = response
        self.notify = notify
        # Writes started and not yet counted, oldest first, each with its "claimed" event.
        self.pending: deque[tuple[asyncio.Task[ImportResult], asyncio.Event]] = deque()
        # What this import's uncommitted writes hold (see `ProfileStore.import_rows`).
        self.held = ImportInFlight()

    async def start(self, rows: list[ImportRow], now: datetime) -> None:
        """Start writing one message's rows, once fewer than MAX_IMPORT_WRITES are pending."""
        if len(self.pending) == MAX_IMPORT_WRITES:
            await self.count_oldest()
        claimed = asyncio.Event()
        previous = self.pending[-1] if self.pending else None
        task = asyncio.create_task(self._write(rows, now, previous, claimed))
        self.pending.append((task, claimed))

    async def count_all(self) -> None:
        while self.pending:
            await self.count_oldest()

    async def settle(self) -> None:
        """The call failed or went away: writes that started finish all the same."""
        if self.pending:
            await asyncio.gather(*(t for t, _ in self.pending), return_exceptions=True)

    async def count_oldest(self) -> None:
        result = await self.pending.popleft()[0]
        response = self.response
        response.rows_upserted += result.upserted
        response.profiles_created += result.profiles_created
        room = MAX_REPORTED_ERRORS - len(response.errors)
        response.errors.extend(
            profile_pb2.ImportRowError(row_number=n, field="marketing_consent", reason=CONSENT_NOT_RESTORED)
            for n in result.consent_not_restored[: max(room, 0)]
        )
        if result.consents_recorded or result.traits_changed:
            self.notify()

    async def _write(
        self,
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
            self.tenant,
            rows,
            now,
            make_profile_id=time_ordered_ids(now),
            claimed=claimed.set,
            before_commit=before_commit,
            held=self.held,
        )


# Requests larger than the kit's default (relevans/kit/server.py): batches of up to 1,000 events or rows.
MAX_BATCH_REQUEST_BYTES = 4 * 1024 * 1024

# ---- the service ------------------------------------------------------------------------------


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
        validate_event_count(len(request.events))  # before any event is converted
        now = self.clock.now()
        protos = list(request.events)
        events = validate_batch([raw_event(e) for e in protos], now)
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
        add = response.results.add  # built in place: cheaper than building each, then copying
        for r in results:
            add(event_id=r.event_id, profile_id=r.profile_id, duplicate=r.duplicate)
        return response

    async def Identify(
        self, request: profile_pb2.IdentifyRequest, context: Context
    ) -> profile_pb2.IdentifyResponse:
        tenant = principal().tenant_id
        now = self.clock.now()
        check_count("consents", len(request.consents), MAX_IDENTIFY_CONSENTS)
        command = validate_identify(
            RawIdentify(
                customer_id=request.customer_id,
                email=request.email,
                anonymous_id=request.anonymous_id,
                first_name=request.first_name,
                consents=tuple(consent_input(c) for c in request.consents),
                traits=from_struct(request.traits, UNSET),
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
        check_count("read_mask.paths", len(request.read_mask.paths), len(PROFILE_FIELDS))
        fields = validate_read_mask(list(request.read_mask.paths))
        profile = await self.store.find_profile(
            tenant, lookup, self.clock.now(), trait_sources="trait_sources" in fields
        )
        return profile_pb2.GetProfileResponse(profile=profile_proto(profile, fields))

    async def BatchGetProfiles(
        self, request: profile_pb2.BatchGetProfilesRequest, context: Context
    ) -> profile_pb2.BatchGetProfilesResponse:
        tenant = principal().tenant_id
        ids = validate_profile_ids(request.profile_ids)
        merged: dict[str, str] = {}
        found = await self.store.get_profiles(tenant, ids, self.clock.now(), merged=merged)
        return profile_pb2.BatchGetProfilesResponse(
            profiles=[profile_proto(p) for p in found], merged_profile_ids=merged
        )

    async def SetTraits(
        self, request: profile_pb2.SetTraitsRequest, context: Context
    ) -> profile_pb2.SetTraitsResponse:
        tenant = principal().tenant_id
        traits = validate_set_traits(request.profile_id, request.source, from_struct(request.traits, UNSET))
        profile = await self.store.set_traits(
            tenant, request.profile_id, request.source, traits, self.clock.now()
        )
        self.notify()
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
        writes = _ImportWrites(self.store, tenant, response, self.notify)
        source: str | None = None
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
                await writes.start(rows, now)
            await writes.count_all()
        finally:
            await writes.settle()
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


def binding(servicer: ProfileServicer) -> ServiceBinding:
    return ServiceBinding(
        full_name=SERVICE_NAME,
        register=profile_pb2_grpc.add_ProfileServiceServicer_to_server,
        servicer=servicer,
        scopes=SCOPES,
        max_request_bytes={"BatchTrack": MAX_BATCH_REQUEST_BYTES, "ImportProfiles": MAX_BATCH_REQUEST_BYTES},
    )
