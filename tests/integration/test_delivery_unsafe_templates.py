"""Templates whose unsafe constructs are refused when saved (issue 16, finding 6), through the real
PutTemplate: what could only fail when a message is rendered is INVALID_ARGUMENT on
`template.body_text`, naming the line, and nothing is stored."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest_asyncio

from relevans.delivery.v1 import delivery_pb2
from relevans.kit.clock import ManualClock
from relevans.kit.settings import Settings
from tests.helpers import field_violations, rpc_error
from tests.helpers.cart import TEMPLATE_ID
from tests.helpers.delivery import TENANT, Harness, token


@pytest_asyncio.fixture
async def delivery(
    settings: Settings, clock: ManualClock, nats_url: str, tmp_path: Path
) -> AsyncIterator[Harness]:
    h = Harness(settings, clock, nats_url, tmp_path / "mail")
    try:
        await h.start()
        yield h
    finally:
        await h.close()


UNSAFE_BODIES = {
    "class of a string": "Hi {{ ''.__class__.__mro__ }}\n",
    "dunder of a variable": "Hi\n{{ event.__mro__ }}\n",
    "dunder by subscript": "Hi {{ event['__class__'] }}\n",
    "dunder by the attr filter": "Hi {{ event | attr('__globals__') }}\n",
    "a blocked str method": "Hi {{ '{0.__class__}'.format(event) }}\n",
    "a huge range": "{% for i in range(10**9) %}x{% endfor %}\n",
    "a huge repetition": "Hi {{ 'a' * 10**9 }}\n",
    "a huge power": "Hi {{ 7 ** 100000 }}\n",
    "a huge padding": "Hi {{ 'a' | center(10**9) }}\n",
    "a huge integer literal": "Hi {{ " + "9" * 5000 + " }}\n",
    "an infinite literal": "Hi {{ 1e999 }}\n",
    "a division by zero": "Hi {{ 1 / 0 }}\n",
    "deeply nested parentheses": "Hi {{ " + "(" * 100 + "1" + ")" * 100 + " }}\n",
    "deeply nested blocks": "Hi\n" + "{% if x %}" * 101 + "y" + "{% endif %}" * 101 + "\n",
}


async def test_put_template_refuses_what_could_only_fail_when_rendered(delivery: Harness) -> None:
    for case, body in UNSAFE_BODIES.items():  # one service for all: each save must fail the same way
        err = await rpc_error(delivery.put_template(body=body))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, case
        violations = field_violations(err)
        assert list(violations) == ["template.body_text"], case
        assert violations["template.body_text"].startswith("does not compile: line "), (case, violations)
    err = await rpc_error(
        delivery.delivery.GetTemplate(
            delivery_pb2.GetTemplateRequest(template_id=TEMPLATE_ID), metadata=token(TENANT, "read")
        )
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND
