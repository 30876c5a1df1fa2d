"""NATS JetStream helpers: streams and durable pull consumers created idempotently,
publishing with `Nats-Msg-Id`, and a consume loop that acks only after the handler's
transaction has committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import itertools
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import nats
import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy, StreamConfig

from relevans.kit import metrics

log = structlog.get_logger(__name__)

DUPLICATE_WINDOW_S = 600.0


@dataclass(frozen=True)
class StreamSpec:
    name: str
    subjects: tuple[str, ...]
    work_queue: bool = False
    # Limits streams: how long a message is kept (0: for ever).
    max_age_s: float = 0.0


STREAMS = (
    StreamSpec("RV_EVENTS", ("rv.events.>",)),
    StreamSpec("RV_PROFILE", ("rv.profile.>",)),
    StreamSpec("RV_DELIVERY_REQUESTS", ("rv.delivery.requests", "rv.delivery.withdrawals"), work_queue=True),
    StreamSpec("RV_DELIVERY_STATUS", ("rv.delivery.status.>",)),
    # Banner notices every delivery process follows from where its snapshot of the table ended
    # (services/delivery/banner_inbox.py); a day covers any process's start.
    StreamSpec("RV_DELIVERY_BANNERS", ("rv.delivery.banners",), max_age_s=86_400.0),
)

MSG_ID_HEADER = "Nats-Msg-Id"
_MSG_ID_HEADER_BYTES = MSG_ID_HEADER.encode()


@functools.lru_cache(maxsize=16_384)  # a profile's events keep coming: hash each one once
def event_partition(tenant_id: str, profile_id: str, partitions: int) -> int:
    """Stable partition of a profile, so one profile's events stay in order on one subject."""
    digest = hashlib.blake2b(f"{tenant_id}/{profile_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % partitions


def event_subject(tenant_id: str, profile_id: str, partitions: int) -> str:
    return f"rv.events.{event_partition(tenant_id, profile_id, partitions)}"


# How long a stopping consumer waits for what its last pull request may still deliver.
_PULL_SETTLE_S = 0.05

BatchHandler = Callable[[Sequence[Msg]], Awaitable[None]]


class PublishError(Exception):
    """JetStream did not confirm a message: an error ack, no stream for its subject, or no ack in time.

    Some messages of the batch may have been stored; publish them again with the same
    `Nats-Msg-Id` and JetStream drops the duplicates.
    """


class _AckBatch:
    """The acks one `publish_batch` call still waits for."""

    __slots__ = ("done", "remaining")

    def __init__(self, remaining: int, done: asyncio.Future[None]) -> None:
        self.remaining = remaining
        self.done = done


def _hpub_frame(message: tuple[str, bytes, str], reply: str, max_payload: int) -> bytes:
    """One message in NATS's wire protocol: `HPUB <subject> <reply> <header bytes> <total bytes>`,
    the `Nats-Msg-Id` header, the payload. Built here rather than by `nc.publish`, which checks the
    subject with a regex and encodes a header dict for every message: the relay's publishing took
    a third less CPU per message this way."""
    subject, payload, msg_id = message
    if not subject or " " in subject or not subject.isprintable() or not msg_id.isprintable():
        raise ValueError(f"cannot publish to {subject!r} with message id {msg_id!r}")
    if len(payload) > max_payload:
        raise PublishError(f"a {len(payload)}-byte message exceeds the server's limit of {max_payload} bytes")
    header = b"NATS/1.0\r\n%s: %s\r\n\r\n" % (_MSG_ID_HEADER_BYTES, msg_id.encode())
    sizes = (len(header), len(header) + len(payload))
    return b"HPUB %s %s %d %d\r\n%s%s\r\n" % (subject.encode(), reply.encode(), *sizes, header, payload)


def _ack_error(msg: Msg) -> str:
    if not msg.data:
        status = (msg.headers or {}).get("Status", "")
        return f"no stream stored the message (status {status or 'none'}: no responders)"
    try:
        error = json.loads(msg.data).get("error", {})
        return f"JetStream error {error.get('code')}/{error.get('err_code')}: {error.get('description')}"
    except (ValueError, AttributeError):
        return f"unexpected publish reply {msg.data[:200]!r}"


class Bus:
    """One NATS connection per service process."""

    def __init__(self, url: str, name: str) -> None:
        self.url = url
        self.name = name
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        # Acks of `publish_batch`: one long-lived subscription per connection, keyed by reply subject.
        self._ack_nc: NatsClient | None = None
        self._ack_prefix = ""
        self._ack_seq = 0
        self._awaiting: dict[str, _AckBatch] = {}

    async def connect(self) -> None:
        if self._nc is None:
            self._nc = await nats.connect(
                self.url, name=self.name, max_reconnect_attempts=-1, reconnect_time_wait=0.5
            )
            self._js = self._nc.jetstream(timeout=5.0, publish_async_max_pending=4000)

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise RuntimeError("bus is not connected")
        return self._js

    @property
    def nc(self) -> NatsClient:
        """The core NATS client."""
        if self._nc is None:
            raise RuntimeError("bus is not connected")
        return self._nc

    async def close(self) -> None:
        """Drain: finish in-flight deliveries and pending publishes. Safe to call twice."""
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None and not nc.is_closed:
            try:
                await nc.drain()
            except Exception:  # drain fails on a broken or reconnecting connection
                with contextlib.suppress(OSError):  # and closing one may find its socket gone
                    await nc.close()

    async def abort(self) -> None:
        """Close at once, as a crashed process's connection ends: nothing in flight is finished
        (its messages come back after their ack wait). Safe to call twice."""
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(OSError):
                await nc.close()

    async def ensure_streams(self, streams: Sequence[StreamSpec] = STREAMS) -> None:
        for spec in streams:
            config = StreamConfig(
                name=spec.name,
                subjects=list(spec.subjects),
                retention=RetentionPolicy.WORK_QUEUE if spec.work_queue else RetentionPolicy.LIMITS,
                duplicate_window=DUPLICATE_WINDOW_S,
                max_age=spec.max_age_s or None,
            )
            try:
                await self.js.stream_info(spec.name)
                await self.js.update_stream(config)
            except nats.js.errors.NotFoundError:
                try:
                    await self.js.add_stream(config)
                except nats.js.errors.BadRequestError:
                    await self.js.update_stream(config)

    async def publish(self, subject: str, payload: bytes, msg_id: str) -> None:
        await self.js.publish(subject, payload, headers={MSG_ID_HEADER: msg_id})

    async def publish_batch(self, messages: Sequence[tuple[str, bytes, str]], timeout: float = 5.0) -> None:
        """Publish `(subject, payload, msg_id)` messages to JetStream and wait until all are stored.

        Plain core-NATS publishes, each with `Nats-Msg-Id` and its own reply subject under
        one long-lived inbox subscription that collects the PubAcks — far cheaper per
        message than `js.publish_async`. Raises `PublishError` when an ack reports an
        error, a subject has no stream, or not every ack arrived within `timeout` seconds
        (acks lost in a reconnect end here too, never in a hang).
        """
        if not messages:
            return
        nc = self.nc
        if self._ack_nc is not nc:
            # nats-py re-subscribes on reconnect; a new connection (after close) needs a new subscription.
            prefix = nc.new_inbox()
            await nc.subscribe(f"{prefix}.*", cb=self._on_ack)
            self._ack_nc, self._ack_prefix = nc, prefix
        prefix = self._ack_prefix
        first = self._ack_seq
        replies = [f"{prefix}.{n}" for n in range(first, first + len(messages))]
        frames = b"".join(map(_hpub_frame, messages, replies, itertools.repeat(nc.max_payload)))
        if nc.is_closed or nc.is_draining_pubs:
            raise PublishError("the NATS connection is closed or draining")
        if not nc.is_connected and len(frames) + nc._pending_data_size > nc._max_pending_size:
            # as `nc.publish`: while reconnecting, the client buffers at most its pending limit
            raise PublishError("NATS is reconnecting and the client's outbound buffer is full")
        self._ack_seq = first + len(messages)
        batch = _AckBatch(len(messages), asyncio.get_running_loop().create_future())
        awaiting = self._awaiting
        for reply in replies:
            awaiting[reply] = batch
        try:
            async with asyncio.timeout(timeout):
                # One write of the whole batch into the client's buffer, as `nc.publish` would
                # queue each message (private methods of the pinned nats-py; see `_hpub_frame`).
                await nc._send_command(frames)
                if nc._flush_queue is not None and nc._flush_queue.empty():
                    await nc._flush_pending()
                await batch.done
        except TimeoutError:
            raise PublishError(
                f"{batch.remaining} of {len(messages)} messages not acknowledged within {timeout} s"
            ) from None
        finally:
            for reply in replies:
                awaiting.pop(reply, None)
            if batch.done.done() and not batch.done.cancelled():
                batch.done.exception()  # retrieved, so an unawaited failure is not logged again
            else:
                batch.done.cancel()

    async def _on_ack(self, msg: Msg) -> None:
        batch = self._awaiting.pop(msg.subject, None)
        if batch is None or batch.done.done():
            return  # the batch already failed or timed out
        data = msg.data
        if not data or b'"error"' in data:
            batch.done.set_exception(PublishError(_ack_error(msg)))
            return
        batch.remaining -= 1
        if batch.remaining == 0:
            batch.done.set_result(None)


class Consumer:
    """A durable pull consumer that hands batches to a handler and acks after it returns.

    The handler commits its own transaction; an exception means nothing was
    committed, so the batch is retried message by message and a message that
    keeps failing is nak'ed with a delay, then terminated after `max_attempts`
    with an error log (never dropped silently). When it stops, it handles what its last pull
    still delivered, so it leaves no message of its own unacked (see `_leftovers`).

    In-order consumption of a partition across processes is `partitioned` with
    `relevans.kit.partitions.PartitionLeases`: one process at a time runs a partition's loop.

    `batches_in_flight` > 1 hands the next batch to the handler while earlier ones are still
    being handled (up to that many at once), for streams whose messages need no order: a handler
    that waits on the network for part of a batch (delivery's sends) leaves its event loop free
    for the next batch's database and lookup work meanwhile.
    """

    def __init__(
        self,
        bus: Bus,
        *,
        service: str,
        stream: str,
        durable: str,
        filter_subject: str,
        handler: BatchHandler,
        batch: int = 200,
        max_attempts: int = 20,
        ack_wait_s: float = 30.0,
        max_ack_pending: int | None = None,
        batches_in_flight: int = 1,
    ) -> None:
        self.bus = bus
        self.service = service
        self.stream = stream
        self.durable = durable
        self.filter_subject = filter_subject
        self.handler = handler
        self.batch = batch
        self.max_attempts = max_attempts
        self.ack_wait_s = ack_wait_s
        self.max_ack_pending = max_ack_pending or batch * 10
        self.batches_in_flight = max(1, batches_in_flight)
        self._in_flight: set[asyncio.Task[None]] = set()

    def config(self, start_seq: int | None = None) -> ConsumerConfig:
        """The durable's configuration; from stream sequence `start_seq` if given, else from the start."""
        return ConsumerConfig(
            durable_name=self.durable,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL if start_seq is None else DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=start_seq,
            ack_wait=self.ack_wait_s,
            max_ack_pending=self.max_ack_pending,
            filter_subject=self.filter_subject,
        )

    async def run(self, stop: asyncio.Event) -> None:
        sub = await self.bus.js.pull_subscribe(
            self.filter_subject, durable=self.durable, stream=self.stream, config=self.config()
        )
        lag_every, since_lag = 50, 50
        try:
            while not stop.is_set():
                if len(self._in_flight) >= self.batches_in_flight:
                    await asyncio.wait(self._in_flight, return_when=asyncio.FIRST_COMPLETED)
                    continue
                try:
                    msgs = await sub.fetch(self.batch, timeout=0.5)
                except (NatsTimeoutError, TimeoutError):
                    msgs = []
                except Exception:
                    if stop.is_set():
                        break
                    log.exception("fetch failed", consumer=self.durable)
                    await asyncio.sleep(0.5)
                    continue
                if msgs:
                    await self._start(msgs)
                since_lag += 1
                if since_lag >= lag_every or not msgs:
                    since_lag = 0
                    await self._record_lag(sub)
            await asyncio.gather(*self._in_flight)
        finally:
            for task in self._in_flight:
                task.cancel()  # only when run() itself was cancelled: a kill, not a stop
        try:
            leftovers = await self._leftovers(sub)
            if leftovers:
                await self._handle(leftovers)
            await sub.unsubscribe()
        except Exception:
            log.debug("unsubscribe after stop failed", consumer=self.durable)

    @staticmethod
    async def _leftovers(sub: JetStreamContext.PullSubscription) -> list[Msg]:
        """Messages a pull delivered after `fetch` returned (a pull request can outlive the client's
        timeout by moments). Left in the subscription, they would stay unacked until `ack_wait`
        and then reach the partition's next holder after newer messages. Reads the pinned
        nats-py's queue, as `fetch` itself does."""
        await asyncio.sleep(_PULL_SETTLE_S)
        queue = sub._sub._pending_queue
        out: list[Msg] = []
        while not queue.empty():
            msg = queue.get_nowait()
            if not JetStreamContext.is_status_msg(msg):
                out.append(msg)
        return out

    async def _record_lag(self, sub: JetStreamContext.PullSubscription) -> None:
        try:
            info = await sub.consumer_info()
            metrics.CONSUMER_LAG.labels(self.service, self.durable).set(info.num_pending or 0)
        except Exception:
            log.debug("consumer info unavailable", consumer=self.durable)

    async def _start(self, msgs: list[Msg]) -> None:
        """Handle the batch: at once with one batch in flight, else beside the others."""
        if self.batches_in_flight == 1:
            await self._handle(msgs)
            return
        task = asyncio.create_task(self._handle_logged(msgs), name=f"{self.durable}-batch")
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _handle_logged(self, msgs: list[Msg]) -> None:
        try:
            await self._handle(msgs)
        except Exception:
            # The bus failed under an ack or a nak: the messages come back after ack_wait.
            log.warning("batch not acknowledged", consumer=self.durable, size=len(msgs), exc_info=True)

    async def _handle(self, msgs: list[Msg]) -> None:
        counter = metrics.CONSUMER_HANDLED
        try:
            await self.handler(msgs)
        except Exception:
            log.warning("batch failed; retrying one by one", consumer=self.durable, size=len(msgs))
        else:
            await asyncio.gather(*(m.ack() for m in msgs))
            counter.labels(self.service, self.durable, "ok").inc(len(msgs))
            return
        for msg in msgs:
            try:
                await self.handler([msg])
            except Exception:
                attempts = msg.metadata.num_delivered or 1
                if attempts >= self.max_attempts:
                    log.error(
                        "message failed too often; terminated",
                        consumer=self.durable,
                        subject=msg.subject,
                        attempts=attempts,
                        exc_info=True,
                    )
                    await msg.term()
                    counter.labels(self.service, self.durable, "terminated").inc()
                else:
                    log.warning("message failed; will retry", consumer=self.durable, attempts=attempts)
                    await msg.nak(delay=min(300.0, 0.5 * 2**attempts))
                    counter.labels(self.service, self.durable, "retried").inc()
            else:
                await msg.ack()
                counter.labels(self.service, self.durable, "ok").inc()


def partitioned(
    bus: Bus,
    *,
    service: str,
    stream: str,
    durable: str,
    subject: str,
    partitions: int,
    handler: BatchHandler,
    batch: int = 200,
) -> list[Consumer]:
    """One consumer per partition: durable `<durable>-<p>` on subject `<subject>.<p>`.

    Run each only while this process holds its partition (`PartitionLeases` in
    `relevans.kit.partitions`): one process at a time consumes a partition, so its messages (hence
    a profile's, see `event_partition`) are handled one batch after another in stream order.
    A holder that gives a partition up stops after acking everything it fetched, so the next one
    starts right after it. `max_ack_pending` equal to the batch bounds how far a partition runs
    ahead of messages left unacked: a message that keeps failing (retried with a delay), or the
    batch of a holder that died (redelivered after `ack_wait`), comes after at most one batch of
    newer ones, the cases where order is not kept.
    """
    return [
        Consumer(
            bus,
            service=service,
            stream=stream,
            durable=f"{durable}-{p}",
            filter_subject=f"{subject}.{p}",
            handler=handler,
            batch=batch,
            max_ack_pending=batch,
        )
        for p in range(partitions)
    ]


async def ensure_durables(bus: Bus, consumers: Sequence[Consumer], start_seq: int | None = None) -> None:
    """Create the durables of `consumers` that do not exist yet (from stream sequence `start_seq`
    if given), so they exist, and keep their messages, before any process runs them: partition
    consumers run only where their partition is held (`partitioned`)."""
    for consumer in consumers:
        try:
            await bus.js.consumer_info(consumer.stream, consumer.durable)
        except nats.js.errors.NotFoundError:
            await bus.js.add_consumer(consumer.stream, consumer.config(start_seq))


async def take_over(bus: Bus, legacy: str, consumers: Sequence[Consumer]) -> None:
    """Replace durable `legacy` by `consumers`: each that does not exist yet starts right after the
    legacy's ack floor, so no message is skipped (the legacy's unacked ones are delivered again,
    and handlers apply a message twice harmlessly), then the legacy is deleted. Nothing to do when
    `legacy` does not exist. Run before the consumers, with the legacy's processes stopped."""
    if not consumers:
        return
    stream = consumers[0].stream
    try:
        info = await bus.js.consumer_info(stream, legacy)
    except nats.js.errors.NotFoundError:
        return
    start = (info.ack_floor.stream_seq if info.ack_floor else 0) + 1
    await ensure_durables(bus, consumers, start)
    with contextlib.suppress(nats.js.errors.NotFoundError):  # another process took over first
        await bus.js.delete_consumer(stream, legacy)
    log.info("durable taken over", legacy=legacy, start_seq=start, consumers=len(consumers))
