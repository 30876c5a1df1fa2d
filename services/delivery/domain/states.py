"""The message state machine of at-most-once sending, the same on every channel.

    pending --claim--> sending --accepted--> sent
       ^                  |----refused/unknown--> failed
       |                  |----address refused for good--> bounced (address suppressed)
       |---transient------|   (after MAX_ATTEMPTS: failed "retries_exhausted")

A message is claimed right before its content goes out (for email: after the
envelope and the DATA command), one at a time per connection. A row found in `sending`
when a request is delivered again belongs to a worker that died between the claim
and writing the outcome: the message may or may not have gone out, so it is
marked failed ("outcome_unknown") and never sent a second time. A row still
`pending` was never handed over, and is decided and sent again once it is due: a
transient failure schedules the next attempt (`next_attempt_at`, see `RetryPolicy`),
and until then a redelivered request leaves the message to the retry worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

# Message states. `sending` is internal: the API shows it as pending.
PENDING = "pending"
SENDING = "sending"
SENT = "sent"
SUPPRESSED = "suppressed"
FAILED = "failed"
# The other side refused the address for good (a hard bounce); the address is suppressed.
BOUNCED = "bounced"
STATUSES = (PENDING, SENDING, SENT, SUPPRESSED, FAILED, BOUNCED)
FINAL_STATUSES = frozenset({SENT, SUPPRESSED, FAILED, BOUNCED})
# Steps after sending, in the history and on rv.delivery.status.* only (the message stays sent):
# an email opened or a banner shown for the first time, a tracked link followed, an unsubscribe
# through the message, a banner withdrawn before it expired.
OPENED = "opened"
CLICKED = "clicked"
UNSUBSCRIBED = "unsubscribed"
WITHDRAWN = "withdrawn"

# Attempts at sending one message before it ends failed "retries_exhausted".
MAX_ATTEMPTS = 8

# Stable reason codes of the state machine (a detail may follow after ": ").
OUTCOME_UNKNOWN = "outcome_unknown"
RETRIES_EXHAUSTED = "retries_exhausted"
RETRYING = "retrying"
HARD_BOUNCE = "hard_bounce"
# Why a message to an address that bounced before is suppressed.
ADDRESS_BOUNCED = "address_bounced"

RedeliveryAction = Literal["process", "skip", "outcome_unknown"]


@dataclass(frozen=True, slots=True)
class Final:
    status: str
    reason: str


def redelivery(status: str, next_attempt_at: datetime | None, now: datetime) -> RedeliveryAction:
    """What to do with a request whose message row is already in `status`: a pending message
    whose next attempt is not yet due is left to the retry worker."""
    if status in FINAL_STATUSES:
        return "skip"
    if status == SENDING:
        return "outcome_unknown"
    if next_attempt_at is not None and next_attempt_at > now:
        return "skip"
    return "process"


def after_transient(attempt: int, why: str) -> Final:
    """The state after a failure worth retrying on the `attempt`-th attempt: pending again (the
    worker schedules the next one), or failed once MAX_ATTEMPTS attempts have been made."""
    if attempt >= MAX_ATTEMPTS:
        return Final(FAILED, f"{RETRIES_EXHAUSTED}: {attempt} attempts: {why}")
    return Final(PENDING, f"{RETRYING}: attempt {attempt}: {why}")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When the next attempt after a transient failure is due: exponential back-off with "equal
    jitter". The n-th retry waits `min(max_delay, base_delay * 2**(n-1))` seconds, half of it
    fixed and the other half random, so a server that asked to be left alone a while (SMTP
    greylisting answers 451 to the first few attempts) is never retried at once, and senders
    that failed together do not come back together."""

    base_delay_s: float = 30.0
    max_delay_s: float = 3600.0

    def delay_s(self, attempt: int, rand: float) -> float:
        """Seconds to wait after the `attempt`-th attempt failed; `rand` is uniform in [0, 1)."""
        ceiling = min(self.max_delay_s, self.base_delay_s * 2 ** max(0, attempt - 1))
        return ceiling / 2 + ceiling / 2 * rand

    def next_attempt_at(self, attempt: int, now: datetime, rand: float) -> datetime:
        return now + timedelta(seconds=self.delay_s(attempt, rand))
