"""The trigger service running for a test: its instances, what it publishes to delivery, its
timers, and the events of the profile service it consumes, published by the test itself."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import grpc
import nats
import sqlalchemy as sa
from nats.js import JetStreamContext
from sqlalchemy.ext.asyncio import AsyncEngine

from relevans.delivery.v1 import bus_pb2 as delivery_bus_pb2
from relevans.kit.bus import event_subject
from relevans.kit.clock import ManualClock
from relevans.kit.db import create_engine
from relevans.kit.proto import to_value
from relevans.kit.server import ServiceHost
from relevans.kit.settings import Settings
from relevans.profile.v1 import bus_pb2 as profile_bus_pb2
from relevans.profile.v1 import profile_pb2
from relevans.trigger.v1 import trigger_pb2, trigger_pb2_grpc
from services.trigger.app import build
from tests.helpers.auth import Tokens
from tests.helpers.cart import cart_trigger

if TYPE_CHECKING:
    from relevans.trigger.v1.trigger_pb2_grpc import TriggerServiceAsyncStub

TENANT = "shop"
token = Tokens(TENANT)


class Harness:
    """One or more running trigger services, a JetStream client and the trigger database."""

    def __init__(self, settings: Settings, clock: ManualClock, nats_url: str) -> None:
        self.settings = settings
        self.clock = clock
        self.nats_url = nats_url
        self.hosts: list[ServiceHost] = []
        self.channel: grpc.aio.Channel | None = None
        self.engine: AsyncEngine = create_engine(settings.database_url("trigger"), pool_size=2)
        self.received: list[delivery_bus_pb2.DeliveryRequest] = []
        self._nc: Any = None
        self._js: JetStreamContext | None = None
        self._requests: JetStreamContext.PullSubscription | None = None

    @classmethod
    @asynccontextmanager
    async def running(
        cls, settings: Settings, clock: ManualClock, nats_url: str, instances: int = 1
    ) -> AsyncIterator[Harness]:
        """`instances` trigger services started, all stopped at the end (a test's fixture)."""
        h = cls(settings, clock, nats_url)
        try:
            for _ in range(instances):
                await h.start()
            yield h
        finally:
            await h.close()

    async def start(self) -> ServiceHost:
        """Build and start one more instance; gRPC calls go to the newest one."""
        host = await build(self.settings, self.clock)
        await host.start()
        self.hosts.append(host)
        if self.channel is not None:
            await self.channel.close(None)
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{host.port}")
        if self._nc is None:  # the streams exist once a service has been built
            self._nc = await nats.connect(self.nats_url)
            self._js = self._nc.jetstream()
            self._requests = await self._js.pull_subscribe(
                "rv.delivery.requests", durable="test-delivery", stream="RV_DELIVERY_REQUESTS"
            )
        return host

    async def stop(self, host: ServiceHost) -> None:
        await host.stop()
        self.hosts.remove(host)

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close(None)
        await asyncio.gather(*(host.stop() for host in self.hosts))  # together, as in System.close
        if self._nc is not None:
            await self._nc.close()
        await self.engine.dispose()

    @property
    def stub(self) -> TriggerServiceAsyncStub:
        assert self.channel is not None
        return trigger_pb2_grpc.TriggerServiceStub(self.channel)

    @property
    def js(self) -> JetStreamContext:
        assert self._js is not None
        return self._js

    async def create(
        self, tenant: str = TENANT, trigger: trigger_pb2.Trigger | None = None
    ) -> trigger_pb2.Trigger:
        reply = await self.stub.CreateTrigger(
            trigger_pb2.CreateTriggerRequest(trigger=trigger or cart_trigger()), metadata=token(tenant)
        )
        return reply.trigger

    def enriched(
        self,
        event_type: str,
        profile_id: str = "p1",
        tenant: str = TENANT,
        at_offset: timedelta = timedelta(0),
        **props: Any,
    ) -> profile_bus_pb2.EnrichedEvent:
        msg = profile_bus_pb2.EnrichedEvent(
            tenant_id=tenant,
            event_id=str(uuid.uuid4()),
            profile_id=profile_id,
            event=profile_pb2.Event(type=event_type, message_id=uuid.uuid4().hex),
            profile=profile_pb2.Profile(profile_id=profile_id, email=f"{profile_id}@example.com"),
        )
        msg.event.timestamp.FromDatetime(self.clock.now() + at_offset)
        msg.receive_time.FromDatetime(self.clock.now())
        msg.event.properties.update(props)
        return msg

    async def publish(self, event: profile_bus_pb2.EnrichedEvent) -> None:
        subject = event_subject(event.tenant_id, event.profile_id, self.settings.event_partitions)
        await self.js.publish(subject, event.SerializeToString())

    async def consumed(self) -> bool:
        """True when the trigger service has processed and acked every published event."""
        for p in range(self.settings.event_partitions):
            info = await self.js.consumer_info("RV_EVENTS", f"trigger-events-{p}")
            if info.num_pending or info.num_ack_pending:
                return False
        return True

    async def requests(self) -> list[delivery_bus_pb2.DeliveryRequest]:
        """Every delivery request received so far (reading and acking what has arrived)."""
        assert self._requests is not None
        try:
            msgs = await self._requests.fetch(20, timeout=0.1)
        except (nats.errors.TimeoutError, TimeoutError):
            msgs = []
        for m in msgs:
            self.received.append(delivery_bus_pb2.DeliveryRequest.FromString(m.data))
            await m.ack()
        return list(self.received)

    async def more_than_one_request(self) -> bool:
        return len(await self.requests()) > 1

    async def timers(self, status: str | None = None) -> list[sa.Row[Any]]:
        query = (
            "SELECT * FROM timers" + (" WHERE status = :status" if status else "") + " ORDER BY started_at"
        )
        async with self.engine.connect() as conn:
            return list((await conn.execute(sa.text(query), {"status": status})).all())

    async def pending(self) -> list[sa.Row[Any]]:
        return await self.timers("pending")

    async def no_pending(self) -> bool:
        return not await self.pending()

    # ---- moments other than events, policies, the decision trace -------------------------------

    async def advance_to(self, when: datetime) -> None:
        """Move the clock forward to `when`."""
        assert when >= self.clock.now(), f"{when} is before {self.clock.now()}"
        await self.clock.advance(when - self.clock.now())

    async def publish_traits(
        self,
        profile_id: str,
        traits: dict[str, Any],
        previous: dict[str, Any] | None = None,
        tenant: str = TENANT,
    ) -> profile_bus_pb2.TraitsChanged:
        """A TraitsChanged as profile publishes it: `traits` after, `previous` the changed ones'
        values before (a name in neither was unchanged; None in `traits` means removed)."""
        previous = previous or {}
        after = {k: v for k, v in traits.items() if v is not None}
        changed = sorted({k for k, v in traits.items() if previous.get(k) != v} | set(previous))
        msg = profile_bus_pb2.TraitsChanged(
            tenant_id=tenant,
            profile_id=profile_id,
            changed=changed,
            source="set_traits",
            change_id=uuid.uuid4().hex,
        )
        for name, value in after.items():
            msg.traits[name].CopyFrom(to_value(value))
        for name, value in previous.items():
            if value is not None:
                msg.previous[name].CopyFrom(to_value(value))
        msg.change_time.FromDatetime(self.clock.now())
        await self.js.publish("rv.profile.traits", msg.SerializeToString())
        return msg

    async def publish_segment(
        self, profile_id: str, segment_id: str, entered: bool, tenant: str = TENANT
    ) -> profile_bus_pb2.SegmentMembershipChanged:
        msg = profile_bus_pb2.SegmentMembershipChanged(
            tenant_id=tenant,
            segment_id=segment_id,
            segment_name=segment_id,
            profile_id=profile_id,
            entered=entered,
            event_id=uuid.uuid4().hex,
        )
        msg.change_time.FromDatetime(self.clock.now())
        await self.js.publish("rv.profile.segments", msg.SerializeToString())
        return msg

    async def set_policy(self, policy: trigger_pb2.Policy, tenant: str = TENANT) -> trigger_pb2.Policy:
        reply = await self.stub.SetPolicy(trigger_pb2.SetPolicyRequest(policy=policy), metadata=token(tenant))
        return reply.policy

    async def explain(
        self, profile_id: str, trigger_id: str = "", tenant: str = TENANT
    ) -> list[trigger_pb2.Decision]:
        """Every decision about a person (all pages), newest first."""
        out: list[trigger_pb2.Decision] = []
        page_token = ""
        while True:
            reply = await self.stub.ExplainDecisions(
                trigger_pb2.ExplainDecisionsRequest(
                    profile_id=profile_id, trigger_id=trigger_id, page_size=200, page_token=page_token
                ),
                metadata=token(tenant),
            )
            out += reply.decisions
            page_token = reply.next_page_token
            if not page_token:
                return out

    async def outcomes(self, profile_id: str, trigger_id: str = "") -> list[tuple[str, str, str]]:
        """(trigger, outcome, reason code) of each decision about a person, oldest first."""
        return [
            (
                d.trigger_id,
                trigger_pb2.DecisionOutcome.Name(d.outcome).removeprefix("DECISION_OUTCOME_").lower(),
                d.reason_code,
            )
            for d in reversed(await self.explain(profile_id, trigger_id))
        ]
