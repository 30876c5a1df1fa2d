"""What a hostile client gets back (issue 16, findings 3-6 and 9): undecodable requests, forged page
tokens, huge ids and conditions each answer a short INVALID_ARGUMENT or NOT_FOUND, never UNKNOWN,
INTERNAL or an error too large for the client to read; auth errors carry an ErrorInfo."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from relevans.delivery.v1 import delivery_pb2
from relevans.profile.v1 import (
    enrichment_pb2,
    enrichment_pb2_grpc,
    profile_pb2,
    segment_pb2,
    segment_pb2_grpc,
)
from relevans.trigger.v1 import trigger_pb2
from tests.helpers import field_violations, rpc_error
from tests.helpers.hostile import (
    DELIVERY,
    HUGE_ID,
    PROFILE,
    SEGMENTS,
    TRIGGER,
    batch_track,
    invalid_utf8,
    page_token,
    raw_call,
    track_with_deep_properties,
    track_with_invalid_utf8,
    wide_condition,
)
from tests.helpers.system import System

# What a client may read of an error: short messages, trailers far below grpc's 8 KiB default.
MAX_MESSAGE = 300
MAX_TRAILER = 8 * 1024


def _error_info(err: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo | None:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


async def test_undecodable_requests_are_invalid_argument(system: System) -> None:
    undecodable = {
        f"/{PROFILE}/Track": [track_with_invalid_utf8(), track_with_deep_properties(200)],
        f"/{PROFILE}/GetProfile": [
            invalid_utf8(profile_pb2.GetProfileRequest(profile_id="\x01\x02").SerializeToString())
        ],
        f"/{SEGMENTS}/CountSegment": [b"\x12\x03\x0a\x01"],  # a Struct cut short
        f"/{TRIGGER}/GetTrigger": [
            invalid_utf8(trigger_pb2.GetTriggerRequest(trigger_id="\x01\x02").SerializeToString())
        ],
        f"/{DELIVERY}/GetMessage": [b"\xff\xff\xff"],
    }
    for method, payloads in undecodable.items():
        channel = system.channels[method.split(".")[1]]
        for payload in payloads:
            answer = await raw_call(channel, method, payload, system.token("shop"))
            assert answer.code == grpc.StatusCode.INVALID_ARGUMENT, (method, answer)
            assert len(answer.details) <= MAX_MESSAGE
            # without a token nothing is decoded: the answer is the same as for any request
            anonymous = await raw_call(channel, method, payload)
            assert anonymous.code == grpc.StatusCode.UNAUTHENTICATED, (method, anonymous)


async def test_undecodable_import_message_is_invalid_argument(system: System) -> None:
    rows = invalid_utf8(
        profile_pb2.ImportProfilesRequest(
            source="csv", rows=[profile_pb2.ImportRow(row_number=1, email="\x01\x02")]
        ).SerializeToString()
    )
    call = system.channels["profile"].stream_unary(f"/{PROFILE}/ImportProfiles")(
        iter([rows]), metadata=system.token("shop")
    )
    err = await rpc_error(call)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err


async def test_forged_page_tokens_are_invalid_argument_on_page_token(system: System) -> None:
    read = system.token("shop", "read")
    for before in (2**63, 10**30, -1, 1.5, "1"):
        request = delivery_pb2.ListMessagesRequest(page_token=page_token(before=before, profile=""))
        err = await rpc_error(system.delivery.ListMessages(request, metadata=read))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (before, err)
        assert "page_token" in field_violations(err)
    for after in (10**30, "../../x", None):
        err = await rpc_error(
            system.triggers.ListTriggers(
                trigger_pb2.ListTriggersRequest(page_token=page_token(after=after)), metadata=read
            )
        )
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (after, err)
        assert "page_token" in field_violations(err)


async def test_a_huge_id_comes_back_short(system: System) -> None:
    calls = [
        (
            system.channels["profile"],
            f"/{PROFILE}/GetProfile",
            profile_pb2.GetProfileRequest(profile_id=HUGE_ID),
        ),
        (
            system.channels["profile"],
            f"/{PROFILE}/SetConsent",
            profile_pb2.SetConsentRequest(
                profile_id=HUGE_ID,
                consent=profile_pb2.ConsentInput(purpose=1, channel=1, status=1, source="form"),
            ),
        ),
        (
            system.channels["profile"],
            f"/{SEGMENTS}/GetSegment",
            segment_pb2.GetSegmentRequest(segment_id=HUGE_ID),
        ),
        (
            system.channels["delivery"],
            f"/{DELIVERY}/GetMessage",
            delivery_pb2.GetMessageRequest(message_id=HUGE_ID),
        ),
        (
            system.channels["trigger"],
            f"/{TRIGGER}/GetTrigger",
            trigger_pb2.GetTriggerRequest(trigger_id=HUGE_ID),
        ),
    ]
    for channel, method, request in calls:
        answer = await raw_call(channel, method, request.SerializeToString(), system.token("shop"))
        assert answer.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT), (
            method,
            answer.code,
        )
        assert len(answer.details) <= MAX_MESSAGE, method
        assert answer.trailer_bytes <= MAX_TRAILER, method


async def test_a_nul_character_postgresql_cannot_store_is_invalid_argument_on_its_field(
    system: System,
) -> None:
    """Found by the fuzz test: ids and properties holding U+0000 answered INTERNAL (PostgreSQL refuses
        NUL in text and jsonb); now INVALID_ARGUMENT naming the field, with nothing written (event
    properties were already checked by ingest's validation)."""
    NUL = "must not contain a NUL character (U+0000)"
    messages = delivery_pb2.GetMessageRequest(message_id="a\x00b")
    err = await rpc_error(system.delivery.GetMessage(messages, metadata=system.token("shop", "read")))
    assert (err.code(), field_violations(err)) == (grpc.StatusCode.INVALID_ARGUMENT, {"message_id": NUL})
    err = await rpc_error(
        system.profiles.GetProfile(
            profile_pb2.GetProfileRequest(profile_id="p\x00"), metadata=system.token("shop", "read")
        )
    )
    assert (err.code(), field_violations(err)) == (grpc.StatusCode.INVALID_ARGUMENT, {"profile_id": NUL})
    event = profile_pb2.Event(type="page_view", anonymous_id="anon-nul", message_id="nul-1")
    event.properties.update({"ok": "fine", "note": "x\x00y"})
    err = await rpc_error(
        system.profiles.Track(profile_pb2.TrackRequest(event=event), metadata=system.token("shop", "ingest"))
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and list(field_violations(err)) == [
        "event.properties"
    ]
    assert await system.scalar("profile", "SELECT count(*) FROM events") == 0
    assert await system.scalar("profile", "SELECT count(*) FROM profiles") == 0


async def test_field_violations_are_capped_with_a_count_of_the_rest(system: System) -> None:
    request = segment_pb2.CountSegmentRequest(condition=wide_condition(10_000))
    segments = segment_pb2_grpc.SegmentServiceStub(system.channels["profile"])
    err = await rpc_error(segments.CountSegment(request, metadata=system.token("shop")))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(field_violations(err)) <= 100
    assert len(err.details() or "") <= MAX_MESSAGE
    info = _error_info(err)
    assert info is not None
    assert int(info.metadata["violations"]) >= 10_000
    assert "more" in (err.details() or "")
    answer = await raw_call(
        system.channels["profile"],
        f"/{SEGMENTS}/CountSegment",
        request.SerializeToString(),
        system.token("shop"),
    )
    assert answer.trailer_bytes <= 4 * MAX_TRAILER


async def test_repeated_fields_are_counted_before_their_items_are_converted(system: System) -> None:
    """A repeated field over its limit is one violation on the field: its items are neither converted
    nor checked one by one (10,000 empty consents were 10,001 violations)."""
    many_consents = profile_pb2.IdentifyRequest(
        email="ann@example.com", consents=[profile_pb2.ConsentInput()] * 10_000
    )
    err = await rpc_error(system.profiles.Identify(many_consents, metadata=system.token("shop", "ingest")))
    assert (err.code(), list(field_violations(err))) == (grpc.StatusCode.INVALID_ARGUMENT, ["consents"])
    many_paths = profile_pb2.GetProfileRequest(email="ann@example.com")
    many_paths.read_mask.paths.extend(f"nope{i}" for i in range(10_000))
    err = await rpc_error(system.profiles.GetProfile(many_paths, metadata=system.token("shop", "read")))
    assert (err.code(), list(field_violations(err))) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        ["read_mask.paths"],
    )
    rules = enrichment_pb2.ScoringRules(rules=[enrichment_pb2.ScoreRule(points=1)] * 10_000)
    enrichment = enrichment_pb2_grpc.EnrichmentServiceStub(system.channels["profile"])
    err = await rpc_error(
        enrichment.SetScoringRules(
            enrichment_pb2.SetScoringRulesRequest(scoring_rules=rules), metadata=system.token("shop", "admin")
        )
    )
    assert (err.code(), list(field_violations(err))) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        ["scoring_rules.rules"],
    )


async def test_an_empty_batch_track_is_refused(system: System) -> None:
    err = await rpc_error(
        system.profiles.BatchTrack(profile_pb2.BatchTrackRequest(), metadata=system.token("shop", "ingest"))
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "events" in field_violations(err)


async def test_an_oversized_batch_is_refused_by_its_count(system: System) -> None:
    answer = await raw_call(
        system.channels["profile"],
        f"/{PROFILE}/BatchTrack",
        batch_track(100_000),
        system.token("shop", "ingest"),
    )
    assert answer.code == grpc.StatusCode.INVALID_ARGUMENT, answer
    assert "1000" in answer.details.replace(",", "") or "events" in answer.details


@pytest.mark.parametrize(
    ("scopes", "code"),
    [((), grpc.StatusCode.UNAUTHENTICATED), (("read",), grpc.StatusCode.PERMISSION_DENIED)],
)
async def test_auth_errors_carry_error_info(
    system: System, scopes: tuple[str, ...], code: grpc.StatusCode
) -> None:
    metadata = system.token("shop", *scopes) if scopes else None
    event = profile_pb2.Event(type="page_view", anonymous_id="a1")
    err = await rpc_error(system.profiles.Track(profile_pb2.TrackRequest(event=event), metadata=metadata))
    assert err.code() == code
    info = _error_info(err)
    assert info is not None, err
    assert (info.reason, info.domain) == (code.name, "relevans.dev")
