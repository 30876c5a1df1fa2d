"""The channel contract: what delivery must know of a channel to send on it. Pure.

A channel says which address of a person it sends to and whether that address can take
a message, how large its templates and rendered messages may be, whether a failed send
is worth trying again, and how the outcome of a send ends the message. The sending itself
is I/O and lives in the channel's transport (`services/delivery/channels/`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

from services.delivery.domain.rendering import RenderLimits
from services.delivery.domain.states import Final

if TYPE_CHECKING:  # decision.py imports the channel registry, so the view is only a type here
    from services.delivery.domain.decision import ProfileView

# Reasons of the address check (a message without a usable address is suppressed).
NO_ADDRESS = "no_address"
INVALID_ADDRESS = "invalid_address"

# The top-level template variables every channel has. Delivery sets the person's (`first_name`,
# sanitized by the name rules, only when there is a usable one: templates say what to print
# instead with `fallback`); the trigger sets the moment's, each kind its own (the event's
# `event`, `event_type`, `event_id`, `event_time`; a date's `date`, `target_date`, `time_zone`;
# a trait change's `trait`, `before`, `after`; a segment's `segment_id`, `transition`).
PERSON_VARIABLES = frozenset({"first_name"})
MOMENT_VARIABLES = frozenset(
    {
        "event",
        "event_type",
        "event_id",
        "event_time",
        "date",
        "target_date",
        "time_zone",
        "trait",
        "before",
        "after",
        "segment_id",
        "transition",
    }
)

# What one send attempt came to:
# - `sent`: the other side took the message;
# - `transient`: nothing was handed over, or the other side asked to try later: retry;
# - `permanent`: the other side refused the message: never retry;
# - `bounced`: the other side refused the address for good (a hard bounce): never retry,
#   and send nothing more to that address on this channel;
# - `unknown`: it broke after the message was on its way; it may have arrived, so it is
#   not sent again.
OutcomeKind = Literal["sent", "transient", "permanent", "bounced", "unknown"]


@dataclass(frozen=True, slots=True)
class SendOutcome:
    kind: OutcomeKind
    detail: str


@dataclass(frozen=True, slots=True)
class SendFailure:
    """A send attempt that did not succeed, as the transport saw it.

    `stage` is the channel's own name for how far the attempt got ("connect", "data", ...);
    `code` is the other side's answer (an SMTP reply, an HTTP status), None when there was none;
    `detail` the rest of the answer (an SMTP enhanced status code and text), "" when none.
    """

    stage: str
    code: int | None
    detail: str = ""


class Channel(ABC):
    """One way of reaching a person: email, and later SMS, webhooks, the web banner."""

    # The lower-case enum name of `relevans.common.v1.Channel` ("email" for CHANNEL_EMAIL).
    name: ClassVar[str]
    limits: ClassVar[RenderLimits]
    # The top-level variables its templates may use; a template using any other is refused
    # when saved. A channel adds the address it sends to (email: `email`).
    variables: ClassVar[frozenset[str]] = PERSON_VARIABLES | MOMENT_VARIABLES

    @abstractmethod
    def address(self, profile: ProfileView) -> str:
        """The person's address on this channel, "" when the profile has none."""

    @abstractmethod
    def address_problem(self, address: str) -> str | None:
        """NO_ADDRESS or INVALID_ADDRESS when no message can go to `address`, else None."""

    @abstractmethod
    def classify(self, failure: SendFailure) -> OutcomeKind:
        """Whether a failed attempt is transient, permanent (of the message, or `bounced`: of the
        address), or of unknown outcome."""

    @abstractmethod
    def final(self, outcome: SendOutcome, attempt: int) -> Final:
        """The message's state after `outcome` on the request's `attempt`-th delivery."""
