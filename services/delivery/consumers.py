"""Bus messages -> domain: the delivery requests on the RV_DELIVERY_REQUESTS work queue.

Each batch is decoded here and handed to the `DeliveryWorker` (worker.py). A transient
failure of a send is the worker's to retry (a scheduled row, retries.py) and the request is
acked; only requests that could not be recorded at all (another worker holds them, the
database could not be written) make the handler raise after everything else is committed,
so the kit's consumer naks them for a later redelivery.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import structlog
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp
from nats.aio.msg import Msg

from relevans.common.v1 import common_pb2
from relevans.delivery.v1 import bus_pb2
from relevans.kit.auth import TENANT_RE
from relevans.kit.bus import Bus, Consumer
from relevans.kit.enums import enum_name
from relevans.kit.proto import from_struct, from_timestamp
from services.delivery.domain import DeliveryRequest
from services.delivery.domain.decision import MAX_IDEMPOTENCY_KEY_CHARS
from services.delivery.worker import DeliveryWorker

log = structlog.get_logger(__name__)

SERVICE = "delivery"
STREAM = "RV_DELIVERY_REQUESTS"
DURABLE = "delivery-requests"
FILTER_SUBJECT = "rv.delivery.requests"


class RetryLater(Exception):
    """Some requests of the batch could not be finished now; the bus redelivers them later."""


def decode_request(data: bytes) -> DeliveryRequest | None:
    """The request, or None when it cannot even be recorded (no tenant or idempotency key)."""
    try:
        m = bus_pb2.DeliveryRequest.FromString(data)
    except DecodeError:
        return None
    if not TENANT_RE.match(m.tenant_id) or not m.idempotency_key:
        return None
    if len(m.idempotency_key) > MAX_IDEMPOTENCY_KEY_CHARS:
        return None
    return DeliveryRequest(
        idempotency_key=m.idempotency_key,
        tenant_id=m.tenant_id,
        profile_id=m.profile_id,
        trigger_id=m.trigger_id,
        channel=enum_name(common_pb2.Channel, m.channel, "CHANNEL_"),
        purpose=enum_name(common_pb2.Purpose, m.purpose, "PURPOSE_"),
        template_id=m.template_id,
        variables=from_struct(m.variables),
        priority=m.priority,
        expire_at=_time(m.expire_time) if m.HasField("expire_time") else None,
        requested_at=_time(m.request_time) if m.HasField("request_time") else None,
    )


def _time(ts: Timestamp) -> datetime | None:
    """A time of the request, None when it is not a valid time."""
    try:
        return from_timestamp(ts)
    except (ValueError, OverflowError):
        return None


def decode_batch(msgs: Sequence[Msg]) -> list[DeliveryRequest]:
    """The batch's requests; one that cannot even be recorded is logged and dropped."""
    requests: list[DeliveryRequest] = []
    for m in msgs:
        request = decode_request(m.data)
        if request is None:
            log.error("unusable delivery request dropped", subject=m.subject, size=len(m.data))
            continue
        requests.append(request)
    return requests


# A batch's sends wait on the network most of the time; the next batch's locks, lookups and inserts
# run meanwhile (its sends wait for the first's: `DeliveryWorker._sending`).
BATCHES_IN_FLIGHT = 2


def request_consumer(bus: Bus, worker: DeliveryWorker, *, batch: int = 200) -> Consumer:
    async def handle(msgs: Sequence[Msg]) -> None:
        retry = await worker.process(decode_batch(msgs))
        if retry:
            raise RetryLater("; ".join(sorted(set(retry)))[:500])

    return Consumer(
        bus,
        service=SERVICE,
        stream=STREAM,
        durable=DURABLE,
        filter_subject=FILTER_SUBJECT,
        handler=handle,
        batch=batch,
        batches_in_flight=BATCHES_IN_FLIGHT,
    )
