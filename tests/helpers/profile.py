"""Calling the profile service in a test: its tokens, events, consents, and what it wrote and published.

The running service comes from the `host`, `stub`, `channel`, `db` and `js` fixtures
(tests/integration/conftest.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import nats
import sqlalchemy as sa
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy
from sqlalchemy.ext.asyncio import AsyncEngine

from relevans.common.v1 import common_pb2
from relevans.profile.v1 import profile_pb2
from tests.helpers.auth import Tokens

if TYPE_CHECKING:
    from relevans.profile.v1.profile_pb2_grpc import ProfileServiceAsyncStub as Stub

TENANT = "shop"
token = Tokens(TENANT, ("ingest", "read"))


async def count(db: AsyncEngine, sql: str, **params: object) -> int:
    async with db.connect() as conn:
        return int(await conn.scalar(sa.text(sql), params) or 0)


async def stream_messages(js: nats.js.JetStreamContext, stream: str) -> int:
    return int((await js.stream_info(stream)).state.messages)


async def fetch_all(js: nats.js.JetStreamContext, subject: str, n: int) -> list[Msg]:
    """The first `n` messages on `subject`, from the start of its stream."""
    sub = await js.subscribe(
        subject, config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL), ordered_consumer=True
    )
    msgs: list[Msg] = []
    try:
        while len(msgs) < n:
            msgs.append(await sub.next_msg(timeout=10))
    finally:
        await sub.unsubscribe()
    return msgs


def ev(type_: str = "page_view", **fields: object) -> profile_pb2.Event:
    props = fields.pop("properties", None)
    e = profile_pb2.Event(type=type_, **fields)  # type: ignore[arg-type]
    if props:
        e.properties.update(props)  # type: ignore[arg-type]
    return e


async def track(stub: Stub, tenant: str = TENANT, **fields: object) -> profile_pb2.TrackResponse:
    type_ = str(fields.pop("type", "page_view"))
    return await stub.Track(profile_pb2.TrackRequest(event=ev(type_, **fields)), metadata=token(tenant))


def granted_marketing_email(source: str = "signup_form") -> profile_pb2.ConsentInput:
    return profile_pb2.ConsentInput(
        purpose=common_pb2.PURPOSE_MARKETING,
        channel=common_pb2.CHANNEL_EMAIL,
        status=common_pb2.CONSENT_STATUS_GRANTED,
        source=source,
        evidence="form-17",
    )
