"""The EnrichedEvent parts ingest encodes by hand, and the TraitsChanged messages, parse as the
messages protobuf would build; what a TraitsChanged says changed."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from relevans.kit.proto import to_timestamp, to_value
from relevans.profile.v1 import bus_pb2, profile_pb2
from services.profile.domain.consent import Consent
from services.profile.domain.identity import Enriched, ProfileState
from services.profile.domain.traits import TraitChange, trait_change
from services.profile.servicers.conversions import consent_proto
from services.profile.wire import snapshot_bytes, traits_changed

AT = datetime(2026, 11, 24, 10, 30, 15, 123456, tzinfo=UTC)


def test_a_full_snapshot_parses_as_the_profile_message() -> None:
    consents = (
        Consent("marketing", "sms", "denied", "form", "", AT),
        Consent("marketing", "email", "granted", "import", "row 7", AT),
    )
    enriched = Enriched(
        traits={
            "plan": "gold",
            "ltv": 1234.5,
            "vip": True,
            "gone": None,
            "address": {"city": "Lund"},
            "n": [1.0],
        },
        tags=("concert", "theatre"),
        counters=(("toy_views", 7, 3), ("toy_views", 30, 300)),
        score=-12.25,
        last_seen={
            "page_view": AT,
            "old": datetime(1969, 7, 20, 20, 17, 40, 5, tzinfo=UTC),
            "epoch": datetime(1970, 1, 1, tzinfo=UTC),
        },
    )
    state = ProfileState("p-1", "c-1", "ann@example.com", "Ann", consents, enriched=enriched)

    parsed = profile_pb2.Profile.FromString(snapshot_bytes(state))

    expected = profile_pb2.Profile(
        profile_id="p-1",
        customer_id="c-1",
        email="ann@example.com",
        first_name="Ann",
        consents=[consent_proto(consents[1]), consent_proto(consents[0])],  # by purpose, channel
        traits={k: to_value(v) for k, v in enriched.traits.items()},
        tags=["concert", "theatre"],
        counters=[
            profile_pb2.CounterValue(name="toy_views", window_days=7, count=3),
            profile_pb2.CounterValue(name="toy_views", window_days=30, count=300),
        ],
        score=-12.25,
        last_seen={t: to_timestamp(at) for t, at in enriched.last_seen.items()},
    )
    assert parsed == expected


def test_a_snapshot_before_enrichment_has_identity_only() -> None:
    parsed = profile_pb2.Profile.FromString(snapshot_bytes(ProfileState("p-2", email="bo@example.com")))
    assert parsed == profile_pb2.Profile(profile_id="p-2", email="bo@example.com")


@given(
    st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31), timezones=st.just(UTC)),
    st.floats(allow_nan=False),
    st.integers(0, 2**63 - 1),
)
def test_times_scores_and_counts_survive_the_encoding(at: datetime, score: float, count: int) -> None:
    enriched = Enriched(counters=(("c", 1, count),), score=score, last_seen={"t": at})
    parsed = profile_pb2.Profile.FromString(snapshot_bytes(ProfileState("p", enriched=enriched)))
    assert parsed.last_seen["t"] == to_timestamp(at)
    assert parsed.score == score
    assert parsed.counters[0].count == count


def test_traits_changed_parse_as_the_messages_each_with_an_id_of_its_own() -> None:
    after = {"plan": "gold", "ltv": 1234.5, "vip": True, "empty": "", "n": 7}
    changes = [
        TraitChange("p-1", after, {"plan": "silver", "vip": 1}, ("gone", "plan", "vip")),
        TraitChange("p-2", {}, {"plan": "gold"}, ("plan",)),
    ]
    parsed = [bus_pb2.TraitsChanged.FromString(b) for b in traits_changed("t-1", changes, AT, "import")]
    for msg, c in zip(parsed, changes, strict=True):
        expected = bus_pb2.TraitsChanged(
            tenant_id="t-1",
            profile_id=c.profile_id,
            traits={k: to_value(v) for k, v in c.traits.items()},
            previous={k: to_value(v) for k, v in c.previous.items()},
            changed=c.changed,
            change_time=to_timestamp(AT),
            source="import",
            change_id=msg.change_id,
        )
        assert msg == expected
    assert parsed[0].traits["empty"].WhichOneof("kind") == "string_value"
    assert len({m.change_id for m in parsed}) == 2 and all(m.change_id for m in parsed)


def test_a_trait_change_names_what_changed_with_its_value_before() -> None:
    before = {"plan": "gold", "tier": 1, "gone": "x", "ltv": 2}
    after = {"plan": "gold", "tier": True, "new": "y", "ltv": 2.0}
    assert trait_change("p", before, after) == TraitChange(
        "p", after, {"tier": 1, "gone": "x"}, ("gone", "new", "tier")
    )
    assert trait_change("p", {"a": 1}, {"a": 1.0}) is None, "1 is 1.0: no change"
    assert trait_change("p", {}, {}) is None
