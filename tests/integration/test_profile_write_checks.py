"""Profile input refused when it is written (issue 16, findings 6 and 9), through the real RPCs:
names without control characters (`Identify`, `ImportProfiles`) and event properties and traits
whose `google.protobuf.Value` has no kind set (`Track`, `BatchTrack`, `Identify`, `SetTraits`).
Each is INVALID_ARGUMENT naming the field (an import row: a row error naming it), nothing written.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc
from google.protobuf import struct_pb2
from sqlalchemy.ext.asyncio import AsyncEngine

from relevans.profile.v1 import profile_pb2
from tests.helpers import field_violations, rpc_error
from tests.helpers.profile import TENANT, count, token

if TYPE_CHECKING:
    from tests.helpers.profile import Stub


# ---- names without control characters ----------------------------------------------------------


FIRST_NAMES = ["Ada\r\nBcc: all@example.com", "Ada\nLovelace", "Ada\tL", "Ada\x7f", "Ada\u2028Lovelace"]


async def test_identify_refuses_a_first_name_with_control_characters(stub: Stub, db: AsyncEngine) -> None:
    for first_name in FIRST_NAMES:  # one service for all: each call must fail the same way
        err = await rpc_error(
            stub.Identify(
                profile_pb2.IdentifyRequest(email="ada@example.com", first_name=first_name), metadata=token()
            )
        )
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, first_name
        assert list(field_violations(err)) == ["first_name"], first_name
    assert await count(db, "SELECT count(*) FROM profiles") == 0


async def _import(stub: Stub, rows: list[profile_pb2.ImportRow]) -> profile_pb2.ImportProfilesResponse:
    async def messages() -> AsyncIterator[profile_pb2.ImportProfilesRequest]:
        yield profile_pb2.ImportProfilesRequest(source="crm", rows=rows)

    reply: profile_pb2.ImportProfilesResponse = await stub.ImportProfiles(messages(), metadata=token())
    return reply


async def test_an_import_row_with_a_control_character_in_a_name_is_a_row_error(
    stub: Stub, db: AsyncEngine
) -> None:
    reply = await _import(
        stub,
        [
            profile_pb2.ImportRow(row_number=2, email="ann@example.com", first_name="Ann\r\nX-Evil: 1"),
            profile_pb2.ImportRow(row_number=3, email="bo@example.com", last_name="Berg\n"),
            profile_pb2.ImportRow(row_number=4, email="cy@example.com", first_name="Cy", last_name="Dahl"),
        ],
    )
    # "Berg\n" is trimmed like every name: a line break at either end is whitespace, not a character.
    assert [(e.row_number, e.field) for e in reply.errors] == [(2, "first_name")]
    assert (reply.rows_upserted, reply.rows_failed) == (2, 1)
    assert await count(db, "SELECT count(*) FROM profiles WHERE email = 'ann@example.com'") == 0


# ---- unset Values --------------------------------------------------------------------------------


def _unset_property(event: profile_pb2.Event, name: str) -> None:
    """A property whose Value has no kind (what a client of another language sends for `{}`)."""
    event.properties.fields[name].CopyFrom(struct_pb2.Value())


async def test_track_refuses_a_property_whose_value_has_no_kind(stub: Stub, db: AsyncEngine) -> None:
    event = profile_pb2.Event(type="page_view", anonymous_id="a-1")
    event.properties.update({"size": 42})
    _unset_property(event, "color")
    err = await rpc_error(stub.Track(profile_pb2.TrackRequest(event=event), metadata=token()))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(field_violations(err)) == ["event.properties.color"]
    assert await count(db, "SELECT count(*) FROM events") == 0


async def test_batch_track_names_a_nested_property_whose_value_has_no_kind(
    stub: Stub, db: AsyncEngine
) -> None:
    good = profile_pb2.Event(type="page_view", anonymous_id="a-1")
    bad = profile_pb2.Event(type="page_view", anonymous_id="a-2")
    bad.properties.update({"cart": {"items": [1, 2]}, "note": None})  # an explicit null is a value
    bad.properties.fields["cart"].struct_value.fields["items"].list_value.values.add()
    err = await rpc_error(
        stub.BatchTrack(profile_pb2.BatchTrackRequest(events=[good, bad]), metadata=token())
    )
    assert list(field_violations(err)) == ["events[1].properties.cart.items[2]"]
    assert await count(db, "SELECT count(*) FROM events") == 0


async def test_traits_whose_value_has_no_kind_are_refused_like_properties(stub: Stub) -> None:
    identify = profile_pb2.IdentifyRequest(customer_id="c-1")
    identify.traits.fields["plan"].CopyFrom(struct_pb2.Value())
    err = await rpc_error(stub.Identify(identify, metadata=token()))
    assert list(field_violations(err)) == ["traits.plan"]

    created = await stub.Identify(profile_pb2.IdentifyRequest(customer_id="c-1"), metadata=token())
    set_traits = profile_pb2.SetTraitsRequest(profile_id=created.profile.profile_id, source="backend")
    set_traits.traits.fields["plan"].CopyFrom(struct_pb2.Value())  # not a removal: that is null_value
    err = await rpc_error(stub.SetTraits(set_traits, metadata=token(TENANT, "admin")))
    assert list(field_violations(err)) == ["traits.plan"]
