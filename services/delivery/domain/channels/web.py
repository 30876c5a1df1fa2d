"""The web channel: an on-site banner in the person's inbox, shown by `GetBanner`.

"Sending" a web message places a banner (a row in delivery's own database, announced to every
delivery process); nothing leaves the service, so the address is the person (their profile id,
always present) and consent applies as on every channel: (purpose, "web"). The template's
subject is the banner's title; body and link are short.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.delivery.domain.channels.base import (
    NO_ADDRESS,
    Channel,
    OutcomeKind,
    SendFailure,
    SendOutcome,
)
from services.delivery.domain.rendering import RenderLimits
from services.delivery.domain.states import FAILED, OUTCOME_UNKNOWN, SENT, Final, after_transient

if TYPE_CHECKING:
    from services.delivery.domain.decision import ProfileView

WEB = "web"
# The banner could not be written (the database refused it for good).
PLACEMENT_FAILED = "placement_failed"
# The banner's moment had passed when it was composed: nothing to show, and nothing failed.
BANNER_EXPIRED = "banner_expired"

MAX_TITLE_CHARS = 200
MAX_BODY_CHARS = 1_000
# The rendered link (click-tracked when the tracking endpoint serves banners).
MAX_LINK_CHARS = 2_000

WEB_LIMITS = RenderLimits(
    subject_source_bytes=1024,
    body_source_bytes=4 * 1024,
    # Title and body together, rendered: MAX_BODY_CHARS characters of up to 4 bytes each.
    output_bytes=4 * (MAX_TITLE_CHARS + MAX_BODY_CHARS),
    subject_chars=MAX_TITLE_CHARS,
)


class WebChannel(Channel):
    name = WEB
    limits = WEB_LIMITS

    def address(self, profile: ProfileView) -> str:
        return profile.profile_id

    def address_problem(self, address: str) -> str | None:
        return None if address else NO_ADDRESS

    def classify(self, failure: SendFailure) -> OutcomeKind:
        """Placing is one transaction in delivery's own database: it committed or it did not,
        so a failure is worth trying again (the placement is keyed by message id)."""
        return "transient"

    def final(self, outcome: SendOutcome, attempt: int) -> Final:
        if outcome.kind == "sent":
            return Final(SENT, f"banner placed: {outcome.detail}")
        if outcome.kind == "permanent":
            return Final(FAILED, f"{PLACEMENT_FAILED}: {outcome.detail}")
        if outcome.kind == "unknown":
            return Final(FAILED, f"{OUTCOME_UNKNOWN}: {outcome.detail}")
        return after_transient(attempt, f"web: {outcome.detail}")
