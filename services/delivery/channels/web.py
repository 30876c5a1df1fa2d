"""The web channel's transport: placing a banner is writing its row (banner_rows.py), which every
delivery process then loads into its inbox (banner_inbox.py).

Messages are claimed through the worker's `Handover` a chunk at a time, placed together in one
transaction with their notices, and reported sent once that committed. A placement is keyed by
message id, so a message claimed and then placed again changes nothing; at most a chunk is
claimed and not yet reported at any moment. A message a dead worker left claimed is sent if its
banner is in the table (`went_out`), else failed "outcome_unknown": nothing of it shows.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import structlog

from relevans.kit.clock import Clock
from services.delivery.banner_rows import BannerRows, Placement
from services.delivery.channels.base import Handover, Outgoing, Refused
from services.delivery.domain import Send, SendOutcome
from services.delivery.domain.banners import PlacedBanner
from services.delivery.domain.channels.web import BANNER_EXPIRED

log = structlog.get_logger(__name__)

# Banners claimed and placed per transaction.
PLACEMENT_CHUNK = 100


@dataclass(frozen=True, slots=True)
class BannerOutgoing(Outgoing):
    """A web message as its transport hands it over: the banner to place."""

    placement: Placement = field(kw_only=True)


class WebTransport:
    def __init__(self, rows: BannerRows, clock: Clock, notify: Callable[[], None] = lambda: None) -> None:
        self.rows = rows
        self.clock = clock
        # Wakes the outbox relay, so the other processes hear of the banner at once.
        self.notify = notify

    def compose(self, message_id: str, send: Send, now: datetime) -> Outgoing:
        """The banner to place; `Refused` (suppressed, not failed) when its moment has passed."""
        content = send.banner
        if content is None:
            raise ValueError("a web message without its banner")
        expire_at = content.expire_at(now)
        if expire_at <= now:
            raise Refused(BANNER_EXPIRED)
        banner = PlacedBanner(
            tenant_id=content.tenant_id,
            message_id=message_id,
            profile_id=send.recipient,
            trigger_id=content.trigger_id,
            placement=content.placement,
            title=send.subject,
            body_text=send.body_text,
            link_url=content.link_url,
            priority=content.priority,
            placed_at=now,
            expire_at=expire_at,
            anonymous_ids=content.anonymous_ids,
        )
        summary = f"{content.placement}: {send.subject}".encode()
        return BannerOutgoing(
            send.recipient, summary, placement=Placement(banner, content.purpose, content.requested_at or now)
        )

    async def went_out(self, messages: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
        """The messages whose banner was placed (a worker died before writing that it was)."""
        return set(await self.rows.load(messages))

    async def send_many(self, messages: Sequence[Outgoing], handover: Handover) -> None:
        for start in range(0, len(messages), PLACEMENT_CHUNK):
            await self._place_chunk(
                range(start, min(start + PLACEMENT_CHUNK, len(messages))), messages, handover
            )

    async def _place_chunk(self, indexes: range, messages: Sequence[Outgoing], handover: Handover) -> None:
        claimed = await asyncio.gather(*(handover.claim(i) for i in indexes))
        mine = [i for i, ok in zip(indexes, claimed, strict=True) if ok]
        placements = []
        for i in mine:
            m = messages[i]
            assert isinstance(m, BannerOutgoing), "the web transport sends what it composed"
            placements.append(m.placement)
        if not placements:
            return
        try:
            await self.rows.place(placements, self.clock.now())
        except Exception as exc:  # nothing was placed: the database refused or went away
            log.warning("banners not placed; will retry", count=len(placements), exc_info=True)
            for i in mine:
                handover.report(i, SendOutcome("transient", f"{type(exc).__name__}: {exc}"[:300]))
            return
        self.notify()
        for i, p in zip(mine, placements, strict=True):
            handover.report(i, SendOutcome("sent", p.banner.placement))
