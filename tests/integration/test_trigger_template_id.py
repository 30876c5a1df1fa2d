"""A trigger's template_id is an id (issue 16, finding 6), through the real CreateTrigger: the id
rule delivery applies to the template it names (`relevans/kit/resource_ids.py`)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest_asyncio

from relevans.kit.clock import ManualClock
from relevans.kit.settings import Settings
from relevans.trigger.v1 import trigger_pb2
from tests.helpers import field_violations, rpc_error
from tests.helpers.cart import cart_trigger
from tests.helpers.trigger import Harness, token


@pytest_asyncio.fixture
async def triggers(settings: Settings, clock: ManualClock, nats_url: str) -> AsyncIterator[Harness]:
    h = Harness(settings, clock, nats_url)
    try:
        await h.start()
        yield h
    finally:
        await h.close()


async def test_create_trigger_refuses_a_template_id_that_is_not_an_id(triggers: Harness) -> None:
    for template_id in ["{{ ''.__class__.__mro__ }}", "Cart Reminder", "-cart", "c" * 64, "cart\nreminder"]:
        trigger = cart_trigger()
        trigger.template_id = template_id
        err = await rpc_error(triggers.create(trigger=trigger))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, template_id
        assert list(field_violations(err)) == ["trigger.template_id"], template_id
    listed = await triggers.stub.ListTriggers(trigger_pb2.ListTriggersRequest(), metadata=token())
    assert list(listed.triggers) == []
