"""The registry of trigger condition kinds: the one place a kind is made known to the service.

Adding a kind: its proto variant in `Trigger.condition`, its module here (implementing
`contract.ConditionKind`), its line in `KINDS`, and its proto conversion in
`services/trigger/condition_protos.py`.
"""

from __future__ import annotations

from services.trigger.domain.kinds.absence import ABSENCE
from services.trigger.domain.kinds.contract import ConditionKind
from services.trigger.domain.kinds.date import DATE
from services.trigger.domain.kinds.event import EVENT
from services.trigger.domain.kinds.inactivity import INACTIVITY
from services.trigger.domain.kinds.segment import SEGMENT
from services.trigger.domain.kinds.threshold import THRESHOLD
from services.trigger.domain.kinds.trait_change import TRAIT_CHANGE

KINDS: dict[str, ConditionKind] = {
    kind.name: kind for kind in (ABSENCE, EVENT, THRESHOLD, INACTIVITY, DATE, SEGMENT, TRAIT_CHANGE)
}


class UnknownConditionKind(LookupError):
    """A stored or requested condition kind this service does not know."""


def kind_named(name: str) -> ConditionKind:
    try:
        return KINDS[name]
    except KeyError:
        known = ", ".join(sorted(KINDS))
        raise UnknownConditionKind(f"unknown trigger condition kind {name!r} (known: {known})") from None
