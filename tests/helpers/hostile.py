"""Requests a hostile client sends, as the bytes on the wire, and a way to send them: the corpus
of issue 16 (huge batches, undecodable bytes, deep Structs, huge ids, conditions with thousands of
keys). Bytes rather than messages, because several of them cannot be built or serialized with
protobuf at all."""

from __future__ import annotations

import base64
import contextlib
import json
from dataclasses import dataclass

import grpc
from google.protobuf import struct_pb2

from relevans.delivery.v1 import delivery_pb2
from relevans.profile.v1 import profile_pb2, segment_pb2
from relevans.trigger.v1 import trigger_pb2
from tests.helpers.fuzz import length_delimited

PROFILE = "relevans.profile.v1.ProfileService"
SEGMENTS = "relevans.profile.v1.SegmentService"
TRIGGER = "relevans.trigger.v1.TriggerService"
DELIVERY = "relevans.delivery.v1.DeliveryService"
HUGE_ID = "x" * 1_000_000


@dataclass(frozen=True)
class Answer:
    """What a raw call answered: its code, its message and the size of its trailing metadata."""

    code: grpc.StatusCode
    details: str
    trailer_bytes: int
    trailers: tuple[tuple[str, str | bytes], ...]


async def raw_call(
    channel: grpc.aio.Channel,
    method: str,
    payload: bytes,
    metadata: tuple[tuple[str, str], ...] | None = None,
) -> Answer:
    """Send `payload` as the request of `method` ("/<service>/<method>"), whatever its bytes."""
    call = channel.unary_unary(method)(payload, metadata=metadata)
    with contextlib.suppress(grpc.aio.AioRpcError):  # the answer is read from the call below
        await call
    trailers = tuple((await call.trailing_metadata()) or ())
    size = sum(len(k) + len(v) for k, v in trailers)
    return Answer(await call.code(), await call.details() or "", size, trailers)


def deep_struct(depth: int) -> bytes:
    """A google.protobuf.Struct nested `depth` levels ({"k": {"k": ...}}), past protobuf's limit."""
    inner = b""
    for _ in range(depth):
        value = length_delimited(5, inner)  # Value.struct_value
        inner = length_delimited(
            1, length_delimited(1, b"k") + length_delimited(2, value)
        )  # Struct.fields entry
    return inner


def track_with_deep_properties(depth: int = 200) -> bytes:
    event = profile_pb2.Event(type="page_view", anonymous_id="a1").SerializeToString()
    return length_delimited(1, event + length_delimited(7, deep_struct(depth)))  # Event.properties is field 7


def invalid_utf8(message: bytes) -> bytes:
    """`message` (serialized with a string field holding "\\x01\\x02") with those bytes made invalid UTF-8."""
    assert message.count(b"\x01\x02") == 1
    return message.replace(b"\x01\x02", b"\xff\xfe")


def track_with_invalid_utf8() -> bytes:
    event = profile_pb2.Event(type="\x01\x02", anonymous_id="a1")
    return invalid_utf8(profile_pb2.TrackRequest(event=event).SerializeToString())


def batch_track(n: int) -> bytes:
    """A BatchTrack request of `n` small events (about 30 bytes each)."""
    event = profile_pb2.Event(type="page_view", anonymous_id="anon-1")
    event.properties.update({"i": 1})
    one = length_delimited(1, event.SerializeToString())
    return one * n


def wide_condition(keys: int) -> struct_pb2.Struct:
    """A segment condition with `keys` unknown keys: one field violation each."""
    condition = struct_pb2.Struct()
    condition.update({f"unknown_node_{i}": {} for i in range(keys)})
    return condition


def page_token(**fields: object) -> str:
    """A page token as a forger makes it: the service's encoding around any JSON."""
    return base64.urlsafe_b64encode(json.dumps(fields).encode()).decode().rstrip("=")


def corpus() -> list[tuple[str, str, bytes]]:
    """(service, method path, request bytes) of every hostile request but the big batches."""
    profile, segments, trigger, delivery = f"/{PROFILE}", f"/{SEGMENTS}", f"/{TRIGGER}", f"/{DELIVERY}"
    wide = wide_condition(10_000)
    return [
        ("profile", f"{profile}/Track", track_with_deep_properties()),
        ("profile", f"{profile}/Track", track_with_invalid_utf8()),
        (
            "profile",
            f"{profile}/GetProfile",
            profile_pb2.GetProfileRequest(profile_id=HUGE_ID).SerializeToString(),
        ),
        (
            "profile",
            f"{profile}/SetConsent",
            profile_pb2.SetConsentRequest(profile_id=HUGE_ID).SerializeToString(),
        ),
        (
            "profile",
            f"{segments}/GetSegment",
            segment_pb2.GetSegmentRequest(segment_id=HUGE_ID).SerializeToString(),
        ),
        (
            "profile",
            f"{segments}/CountSegment",
            segment_pb2.CountSegmentRequest(condition=wide).SerializeToString(),
        ),
        (
            "profile",
            f"{segments}/CreateSegment",
            segment_pb2.CreateSegmentRequest(name="wide", condition=wide).SerializeToString(),
        ),
        (
            "trigger",
            f"{trigger}/GetTrigger",
            trigger_pb2.GetTriggerRequest(trigger_id=HUGE_ID).SerializeToString(),
        ),
        (
            "trigger",
            f"{trigger}/GetTrigger",
            invalid_utf8(trigger_pb2.GetTriggerRequest(trigger_id="\x01\x02").SerializeToString()),
        ),
        (
            "delivery",
            f"{delivery}/GetMessage",
            delivery_pb2.GetMessageRequest(message_id=HUGE_ID).SerializeToString(),
        ),
        (
            "delivery",
            f"{delivery}/ListMessages",
            delivery_pb2.ListMessagesRequest(
                page_token=page_token(before=2**63, profile="")
            ).SerializeToString(),
        ),
    ]
