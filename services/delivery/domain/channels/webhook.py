"""The webhook channel's rules: a message handed to a system (a CRM), not to the person.

The "address" of a webhook message is the person it is about (their profile id, always
there); where it goes is the template's endpoint (`Template.webhook_endpoint_id`). How an
HTTP attempt ends the message:

- 2xx: sent;
- nothing sent yet (the name did not resolve, no connection): transient, retried;
- 429 or 5xx: transient, retried;
- the address check refused the URL or a redirect, another 3xx, any other 4xx: permanent;
- the connection broke or timed out after the request went out: transient, retried with the
  same `webhook-id` (the message id). Unlike a mail or a text, a webhook carries an id the
  receiver deduplicates by (the Standard Webhooks contract), so a repeat of a request whose
  answer was lost is safe, where giving up would lose the hand-over.

A message claimed and never answered because delivery itself died is still `outcome_unknown`
(states.py): that is the worker's rule for every channel, not an HTTP outcome.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.delivery.domain.channels.base import NO_ADDRESS, Channel, OutcomeKind, SendFailure, SendOutcome
from services.delivery.domain.rendering import DEFAULT_LIMITS
from services.delivery.domain.states import FAILED, OUTCOME_UNKNOWN, SENT, Final, after_transient

if TYPE_CHECKING:
    from services.delivery.domain.decision import ProfileView

# Stages of an attempt (`SendFailure.stage`), in order.
STAGE_ADDRESS = "address"  # the URL or a redirect's target failed the address check
STAGE_CONNECT = "connect"  # resolving the name or connecting; nothing was sent
STAGE_SENT = "sent"  # the request went out


class WebhookChannel(Channel):
    name = "webhook"
    limits = DEFAULT_LIMITS

    def address(self, profile: ProfileView) -> str:
        return profile.profile_id

    def address_problem(self, address: str) -> str | None:
        return None if address else NO_ADDRESS

    def classify(self, failure: SendFailure) -> OutcomeKind:
        if failure.stage == STAGE_ADDRESS:
            return "permanent"
        if failure.code is not None:
            return "transient" if failure.code == 429 or failure.code >= 500 else "permanent"
        return "transient"

    def final(self, outcome: SendOutcome, attempt: int) -> Final:
        """The transport's details of a failure start with their reason code
        (`domain.webhooks.WEBHOOK_REJECTED`, `ADDRESS_BLOCKED`, ...)."""
        if outcome.kind == "sent":
            return Final(SENT, f"webhook: {outcome.detail}")
        if outcome.kind == "permanent":
            return Final(FAILED, outcome.detail)
        if outcome.kind == "unknown":
            return Final(FAILED, f"{OUTCOME_UNKNOWN}: {outcome.detail}")
        return after_transient(attempt, f"webhook: {outcome.detail}")
