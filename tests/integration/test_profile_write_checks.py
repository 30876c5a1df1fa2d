"""Profile input refused when it is written (issue 16, finding 6), through the real RPCs: names
without control characters (`Identify`, `ImportProfiles`). Each is INVALID_ARGUMENT naming the
field (an import row: a row error naming it), nothing written.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from relevans.profile.v1 import profile_pb2
from tests.helpers import field_violations, rpc_error
from tests.helpers.profile import count, token

if TYPE_CHECKING:
    from tests.helpers.profile import Stub


# ---- names without control characters ----------------------------------------------------------


@pytest.mark.parametrize(
    "first_name", ["Ada\r\nBcc: all@example.com", "Ada\nLovelace", "Ada\tL", "Ada\x7f", "Ada\u2028Lovelace"]
)
async def test_identify_refuses_a_first_name_with_control_characters(
    stub: Stub, db: AsyncEngine, first_name: str
) -> None:
    err = await rpc_error(
        stub.Identify(
            profile_pb2.IdentifyRequest(email="ada@example.com", first_name=first_name), metadata=token()
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(field_violations(err)) == ["first_name"]
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
