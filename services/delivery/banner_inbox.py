"""Every delivery process's banner inbox, kept equal to the `banners` table without a database
round trip on `GetBanner`'s path; the shows it answers, counted off that path; and the consumers
that withdraw banners (a moment that passed, a consent withdrawn).

Startup (`BannerBoard.load`, before the process serves): note the last sequence of the stream
RV_DELIVERY_BANNERS, then read every live banner from the table. Then (`BannerBoard.run`) follow
the stream from right after that sequence with an ordered consumer of this process alone. A
banner's notice is published (outbox relay) only after its row committed, so a notice at or
before the noted sequence is of a row the snapshot, read afterwards, already shows, and every
later notice is followed: nothing placed during startup is missed. A notice makes the process
read that row again (a batch of notices is one query), so notices that come twice or late change
nothing. Memory stays bounded by what may still be shown: a withdrawn, expired or deleted banner
leaves the inbox when its notice comes, and expired ones are pruned as the clock passes them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

import structlog
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy
from sqlalchemy.ext.asyncio import AsyncEngine

from relevans.common.v1 import common_pb2
from relevans.delivery.v1 import bus_pb2 as delivery_bus_pb2
from relevans.delivery.v1 import delivery_pb2
from relevans.kit.bus import Bus, Consumer
from relevans.kit.clock import Clock
from relevans.kit.enums import enum_name
from relevans.kit.proto import from_timestamp, varint
from relevans.profile.v1 import bus_pb2 as profile_bus_pb2
from services.delivery.banner_rows import (
    BANNERS_SUBJECT,
    CONSENT_WITHDRAWN,
    EXPIRE_BATCH,
    BannerKey,
    BannerRows,
)
from services.delivery.domain.banners import PRUNE_STEP, BannerInbox, InboxEntry, PlacedBanner
from services.delivery.domain.channels.web import WEB
from services.delivery.domain.decision import TRANSACTIONAL, WITHDRAWN_STATUSES

log = structlog.get_logger(__name__)

BANNERS_STREAM = "RV_DELIVERY_BANNERS"
# Notices reloaded per query; a sweep for expired banners in memory starts at most this often.
RELOAD_BATCH = 500
PRUNE_EVERY = timedelta(minutes=1)
# Distinct answer contents kept to share: banners that render alike (a template with no personal
# variable) hold one bytes object. Forgotten when this many, so a process whose banners are all
# personal keeps at most this many it may no longer need.
SHARED_CONTENTS = 4_096
# GetBanner's answer when there is no banner: GetBannerResponse() serialized.
NO_BANNER = b""
# Shows are written at most this often (seconds of real time: a batching delay, not a deadline).
SHOWS_FLUSH_S = 0.5
RETRY_S = 1.0
# How often (real seconds) a process looks for banners the clock has passed.
EXPIRY_POLL_S = 1.0

# The reason recorded on a banner whose moment passed, when the trigger gives none.
MOMENT_PASSED = "cancelled"


class BannerBoard:
    """This process's inbox and its show counts."""

    def __init__(self, rows: BannerRows, bus: Bus, clock: Clock) -> None:
        self.rows = rows
        self.bus = bus
        self.clock = clock
        self.inbox = BannerInbox()
        self._next_seq = 1
        self._pruned_at: datetime | None = None
        # (tenant, message id) -> (shows not yet written, when first shown here)
        self._shows: dict[BannerKey, tuple[int, datetime]] = {}
        self._shown_wake = asyncio.Event()
        self._contents: dict[bytes, bytes] = {}

    # ---- the hot path ----------------------------------------------------------------------------

    def answer(
        self, tenant_id: str, placement: str, *, profile_id: str = "", anonymous_id: str = ""
    ) -> bytes:
        """GetBanner's answer, serialized: the person's best banner for `placement` now (counted as
        shown), or NO_BANNER."""
        person = profile_id or self.inbox.person_of(tenant_id, anonymous_id)
        if not person:
            return NO_BANNER
        now = self.clock.now()
        banner = self.inbox.best(tenant_id, person, placement, now)
        if banner is None:
            return NO_BANNER
        key = (tenant_id, banner.message_id)
        count, first = self._shows.get(key, (0, now))
        self._shows[key] = (count + 1, first)
        self._shown_wake.set()
        return answer_bytes(banner)

    # ---- keeping the inbox -----------------------------------------------------------------------

    async def load(self) -> int:
        """Note where the stream is, then read the live banners; call before serving."""
        info = await self.bus.js.stream_info(BANNERS_STREAM)
        self._next_seq = (info.state.last_seq or 0) + 1
        now = self.clock.now()
        async for chunk in self.rows.live(now):
            for banner in chunk:
                self.hold(banner, now)
        self._pruned_at = now
        log.info("banners loaded", count=len(self.inbox), from_seq=self._next_seq)
        return len(self.inbox)

    async def run(self, stop: asyncio.Event) -> None:
        """Follow the stream from where the snapshot ended until `stop`."""
        notices: asyncio.Queue[Msg] = asyncio.Queue()

        async def queue(msg: Msg) -> None:
            notices.put_nowait(msg)

        sub = await self.bus.js.subscribe(
            BANNERS_SUBJECT,
            stream=BANNERS_STREAM,
            cb=queue,
            ordered_consumer=True,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=self._next_seq
            ),
        )
        waiting: set[BannerKey] = set()
        try:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    waiting.update(_keys([await asyncio.wait_for(notices.get(), 0.5)]))
                while not notices.empty() and len(waiting) < RELOAD_BATCH:
                    waiting.update(_keys([notices.get_nowait()]))
                if waiting:
                    try:
                        await self.reload(waiting)
                        waiting = set()
                    except Exception:
                        log.warning("banners not reloaded; retrying", count=len(waiting), exc_info=True)
                        await _pause(stop, RETRY_S)
                self._prune()
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def reload(self, keys: set[BannerKey]) -> None:
        """Make the inbox hold what the table holds for `keys`."""
        found = await self.rows.load(keys)
        now = self.clock.now()
        for key in keys:
            banner = found.get(key)
            if banner is None:
                self.inbox.drop(*key)
            else:
                self.hold(banner, now)

    def hold(self, banner: PlacedBanner, now: datetime) -> None:
        """Keep `banner` as the table now holds it (withdrawn or expired: not at all), its content
        shared with the banners held of the same content."""
        content = banner_payload(banner)
        if len(self._contents) >= SHARED_CONTENTS:
            self._contents.clear()
        self.inbox.put(banner, self._contents.setdefault(content, content), now)

    def _prune(self) -> None:
        """A step of a sweep for expired banners (one starts at most every PRUNE_EVERY): the
        answer leaves them out already; this frees their memory without holding the loop."""
        now = self.clock.now()
        if not self.inbox.sweeping:
            if self._pruned_at is not None and now - self._pruned_at < PRUNE_EVERY:
                return
            self._pruned_at = now
        dropped = self.inbox.prune(now, PRUNE_STEP)
        if dropped:
            log.debug("expired banners pruned", count=dropped)

    # ---- counting shows --------------------------------------------------------------------------

    async def flush_shows(self, stop: asyncio.Event) -> None:
        """Write the shows counted since the last write, at most every SHOWS_FLUSH_S; on stop, the
        rest. A write that fails keeps its counts for the next one."""
        while not stop.is_set():
            wake = asyncio.create_task(self._shown_wake.wait())
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait({wake, stopped}, return_when=asyncio.FIRST_COMPLETED)
            for task in (wake, stopped):
                task.cancel()
            await self._write_shows()
            await _pause(stop, SHOWS_FLUSH_S)
        await self._write_shows()

    async def _write_shows(self) -> None:
        self._shown_wake.clear()
        shows, self._shows = self._shows, {}
        if not shows:
            return
        try:
            await self.rows.record_shows(shows)
        except Exception:
            log.warning("banner shows not written; keeping them", count=len(shows), exc_info=True)
            for key, (count, first) in shows.items():
                more, _ = self._shows.get(key, (0, first))
                self._shows[key] = (count + more, first)


def banner_payload(b: PlacedBanner) -> bytes:
    """The content of the answer GetBanner gives for a banner, serialized once when it enters the
    inbox: all but its message id and expiry (which the inbox keeps anyway), so that banners of
    the same content can share it."""
    return delivery_pb2.Banner(
        trigger_id=b.trigger_id,
        placement=b.placement,
        title=b.title,
        body_text=b.body_text,
        link_url=b.link_url,
        priority=b.priority,
    ).SerializeToString()


def answer_bytes(e: InboxEntry) -> bytes:
    """GetBannerResponse(banner=...) of an entry, serialized by hand (building the messages took
    ~4 µs a call): a message's encoding is its fields one after another, in any order, so the
    banner is its message id (field 1) and expiry (field 8, a Timestamp) followed by the content
    the entry keeps."""
    message_id = e.message_id.encode()
    seconds, micros = divmod(round(e.expire_at * 1_000_000), 1_000_000)
    expiry = b"\x08" + varint(seconds) + (b"\x10" + varint(micros * 1_000) if micros else b"")
    banner = b"".join(
        (b"\x0a", varint(len(message_id)), message_id, b"\x42", varint(len(expiry)), expiry, e.payload)
    )
    return b"\x0a" + varint(len(banner)) + banner


async def _pause(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


def _keys(msgs: Sequence[Msg]) -> list[BannerKey]:
    out = []
    for m in msgs:
        try:
            notice = delivery_bus_pb2.DeliveryStatusChanged.FromString(m.data)
        except DecodeError:
            log.error("undecodable banner notice skipped", size=len(m.data))
            continue
        if notice.tenant_id and notice.message_id:
            out.append((notice.tenant_id, notice.message_id))
    return out


# ---- withdrawing: the moment passed, consent withdrawn ---------------------------------------------

WITHDRAWALS_STREAM = "RV_DELIVERY_REQUESTS"
WITHDRAWALS_SUBJECT = "rv.delivery.withdrawals"
WITHDRAWALS_DURABLE = "delivery-withdrawals"
CONSENT_STREAM = "RV_PROFILE"
CONSENT_SUBJECT = "rv.profile.consent"
CONSENT_DURABLE = "delivery-banner-consent"


class Withdrawals:
    """Withdraws waiting banners in the table (with history, status and notices, one transaction
    per batch); the notices take them out of every inbox."""

    def __init__(
        self, engine: AsyncEngine, rows: BannerRows, clock: Clock, notify: Callable[[], None]
    ) -> None:
        self.engine = engine
        self.rows = rows
        self.clock = clock
        self.notify = notify

    async def moments_passed(self, msgs: Sequence[Msg]) -> None:
        """`DeliveryWithdrawal`s: the person's waiting banners of that trigger go."""
        found = []
        for m in msgs:
            try:
                w = delivery_bus_pb2.DeliveryWithdrawal.FromString(m.data)
            except DecodeError:
                log.error("undecodable withdrawal skipped", size=len(m.data))
                continue
            if w.tenant_id and w.profile_id and w.trigger_id:
                found.append(w)
        if not found:
            return
        now = self.clock.now()
        withdrawn = 0
        async with self.engine.begin() as conn:
            for w in found:
                ended = (_time(w.withdraw_time) if w.HasField("withdraw_time") else None) or now
                ids = await self.rows.withdraw(
                    conn,
                    w.tenant_id,
                    w.profile_id,
                    w.reason or MOMENT_PASSED,
                    now,
                    trigger_id=w.trigger_id,
                    moment_ended=ended,
                )
                withdrawn += len(ids)
        if withdrawn:
            self.notify()

    async def consents_withdrawn(self, msgs: Sequence[Msg]) -> None:
        """`ConsentChanged` on the web channel: remembered per person and purpose (a banner whose
        placement races the change is checked against it), and when withdrawn or denied, the
        person's banners of that purpose requested before the change go (transactional ones
        stay, as consent does not hold them back)."""
        found = []
        for m in msgs:
            try:
                c = profile_bus_pb2.ConsentChanged.FromString(m.data)
            except DecodeError:
                log.error("undecodable consent change skipped", size=len(m.data))
                continue
            if not (c.tenant_id and c.profile_id and c.HasField("consent")):
                continue
            channel = enum_name(common_pb2.Channel, c.consent.channel, "CHANNEL_")
            purpose = enum_name(common_pb2.Purpose, c.consent.purpose, "PURPOSE_")
            if channel == WEB and purpose != TRANSACTIONAL:
                status = enum_name(common_pb2.ConsentStatus, c.consent.status, "CONSENT_STATUS_")
                at = _time(c.consent.update_time) if c.consent.HasField("update_time") else None
                found.append((c.tenant_id, c.profile_id, purpose, status, at))
        if not found:
            return
        now = self.clock.now()
        withdrawn = 0
        async with self.engine.begin() as conn:
            for tenant_id, profile_id, purpose, status, at in found:
                refused = status in WITHDRAWN_STATUSES
                await self.rows.remember_consent(conn, tenant_id, profile_id, purpose, refused, at or now)
                if refused:
                    ids = await self.rows.withdraw(
                        conn,
                        tenant_id,
                        profile_id,
                        CONSENT_WITHDRAWN,
                        now,
                        purpose=purpose,
                        requested_before=at or now,
                    )
                    withdrawn += len(ids)
        if withdrawn:
            self.notify()


class Expiry:
    """Closes the banners whose time has passed, in the table (memory prunes them by the clock
    alone): their row leaves the live index, one never shown is `withdrawn` "expired" in its
    history; closed ones are deleted after `banner_rows.RETENTION`."""

    def __init__(self, rows: BannerRows, clock: Clock, notify: Callable[[], None]) -> None:
        self.rows = rows
        self.clock = clock
        self.notify = notify

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                closed = await self.rows.expire(self.clock.now())
            except Exception:
                log.warning("expired banners not closed; retrying", exc_info=True)
                closed = 0
            if closed:
                self.notify()
            if closed < EXPIRE_BATCH:
                await _pause(stop, EXPIRY_POLL_S)


def _time(ts: Timestamp) -> datetime | None:
    """A time a bus message gives, None when it is not a valid one."""
    try:
        return from_timestamp(ts)
    except (ValueError, OverflowError):
        return None


def withdrawal_consumers(bus: Bus, withdrawals: Withdrawals) -> list[Consumer]:
    """The durables that withdraw banners: one on the trigger's withdrawals, one on consent changes."""
    return [
        Consumer(
            bus,
            service="delivery",
            stream=WITHDRAWALS_STREAM,
            durable=WITHDRAWALS_DURABLE,
            filter_subject=WITHDRAWALS_SUBJECT,
            handler=withdrawals.moments_passed,
        ),
        Consumer(
            bus,
            service="delivery",
            stream=CONSENT_STREAM,
            durable=CONSENT_DURABLE,
            filter_subject=CONSENT_SUBJECT,
            handler=withdrawals.consents_withdrawn,
        ),
    ]
