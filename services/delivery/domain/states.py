"""The message state machine of at-most-once sending, the same on every channel.

    pending --claim--> sending --accepted--> sent
       ^                  |----refused/unknown--> failed
       |---transient------|   (after MAX_ATTEMPTS: failed "retries_exhausted")

A message is claimed right before its content goes out (for email: after the
envelope, before DATA), one at a time per connection. A row found in `sending`
when a request is delivered again belongs to a worker that died between the claim
and writing the outcome: the message may or may not have gone out, so it is
marked failed ("outcome_unknown") and never sent a second time. A row still
`pending` was never handed over, and is decided and sent again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# Message states. `sending` is internal: the API shows it as pending.
PENDING = "pending"
SENDING = "sending"
SENT = "sent"
SUPPRESSED = "suppressed"
FAILED = "failed"
STATUSES = (PENDING, SENDING, SENT, SUPPRESSED, FAILED)
FINAL_STATUSES = frozenset({SENT, SUPPRESSED, FAILED})
# Steps after sending, in the history only (the message stays sent): a banner shown for the
# first time, a banner withdrawn before it expired.
OPENED = "opened"
WITHDRAWN = "withdrawn"

MAX_ATTEMPTS = 8

# Stable reason codes of the state machine (a detail may follow after ": ").
OUTCOME_UNKNOWN = "outcome_unknown"
RETRIES_EXHAUSTED = "retries_exhausted"
RETRYING = "retrying"

RedeliveryAction = Literal["process", "skip", "outcome_unknown"]


@dataclass(frozen=True, slots=True)
class Final:
    status: str
    reason: str


def redelivery(status: str) -> RedeliveryAction:
    """What to do with a request whose message row is already in `status`."""
    if status in FINAL_STATUSES:
        return "skip"
    if status == SENDING:
        return "outcome_unknown"
    return "process"


def after_transient(attempt: int, why: str) -> Final:
    """The state after a failure worth retrying: pending again, or failed once attempts run out."""
    if attempt >= MAX_ATTEMPTS:
        return Final(FAILED, f"{RETRIES_EXHAUSTED}: {why}")
    return Final(PENDING, f"{RETRYING}: {why}")
