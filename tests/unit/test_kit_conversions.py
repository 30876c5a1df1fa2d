"""Unit tests of the kit's shared conversions: enum names, Struct values, pages, identifier hashes,
advisory-lock keys. Each replaced copies in the services that differed in small ways."""

from __future__ import annotations

import math

import pytest
from google.protobuf import struct_pb2
from hypothesis import given
from hypothesis import strategies as st

from relevans.common.v1 import common_pb2
from relevans.kit.enums import enum_name, enum_value
from relevans.kit.errors import InvalidArgument
from relevans.kit.identifiers import identifier_hash
from relevans.kit.locks import lock_key32, lock_key64
from relevans.kit.paging import PageSize, decode_page_token, encode_page_token
from relevans.kit.proto import from_struct, from_value, to_value


def test_enum_names_drop_the_prefix_and_unknown_numbers_stay_numbers() -> None:
    assert enum_name(common_pb2.Channel, common_pb2.CHANNEL_EMAIL, "CHANNEL_") == "email"
    assert enum_name(common_pb2.Purpose, common_pb2.PURPOSE_MARKETING, "PURPOSE_") == "marketing"
    assert enum_name(common_pb2.Channel, 977, "CHANNEL_") == "977"


def test_enum_values_are_the_reverse_and_unknown_names_are_unspecified() -> None:
    for number in common_pb2.ConsentStatus.values():
        name = enum_name(common_pb2.ConsentStatus, number, "CONSENT_STATUS_")
        assert enum_value(common_pb2.ConsentStatus, name, "CONSENT_STATUS_") == number
    assert enum_value(common_pb2.Channel, "EMAIL", "CHANNEL_") == common_pb2.CHANNEL_EMAIL
    assert enum_value(common_pb2.Channel, "pigeon", "CHANNEL_") == common_pb2.CHANNEL_UNSPECIFIED


def test_struct_numbers_follow_one_rule() -> None:
    s = struct_pb2.Struct()
    s.update({"qty": 2.0, "price": 9.5, "big": 2.0**60, "neg": -3.0, "nested": {"n": [1.0, 0.25]}})
    s.fields["nan"].number_value = math.nan
    s.fields["inf"].number_value = -math.inf
    plain = from_struct(s)
    assert plain == {
        "qty": 2,
        "price": 9.5,
        "big": 2.0**60,
        "neg": -3,
        "nested": {"n": [1, 0.25]},
        "nan": None,
        "inf": None,
    }
    assert type(plain["qty"]) is int and type(plain["big"]) is float and type(plain["nested"]["n"][0]) is int
    assert from_value(to_value(None)) is None and from_value(struct_pb2.Value()) is None


@given(
    st.recursive(
        st.none() | st.booleans() | st.text() | st.integers(-(2**53), 2**53),
        lambda c: st.lists(c) | st.dictionaries(st.text(), c),
    )
)
def test_json_values_survive_a_round_trip(value: object) -> None:
    assert from_value(to_value(value)) == value


def test_page_sizes_default_clamp_or_refuse() -> None:
    clamp = PageSize(default=50, maximum=100)
    assert (clamp.of(0), clamp.of(7), clamp.of(100), clamp.of(101)) == (50, 7, 100, 100)
    refuse = PageSize(default=100, maximum=1000, refuse_over_maximum=True)
    assert refuse.of(1000) == 1000
    for size, rule in ((-1, clamp), (-1, refuse), (1001, refuse)):
        with pytest.raises(InvalidArgument) as caught:
            rule.of(size)
        assert [v.field for v in caught.value.violations] == ["page_size"]


def test_page_tokens_round_trip_and_forged_ones_are_refused_on_page_token() -> None:
    token = encode_page_token(before=41, profile="p-1")
    assert decode_page_token(token, before=int, profile=str) == {"before": 41, "profile": "p-1"}
    assert decode_page_token("", before=int) is None
    forged = [
        "***",
        "YQ=x",
        "//8",
        encode_page_token(before=2**63),
        encode_page_token(before=10**30),
        encode_page_token(before=-1),
        encode_page_token(before="41"),
        encode_page_token(after="x"),
        encode_page_token(before=1, extra=2),
    ]
    for bad in forged:
        with pytest.raises(InvalidArgument) as caught:
            decode_page_token(bad, before=int)
        assert [v.field for v in caught.value.violations] == ["page_token"], bad


def test_an_identifier_hashes_the_same_whatever_its_case_or_surrounding_space() -> None:
    assert identifier_hash("Ann@Example.com") == identifier_hash(" ann@example.com\n")
    assert identifier_hash("ann@example.com") != identifier_hash("bob@example.com")
    assert len(identifier_hash("+4520000000")) == 64


def test_lock_keys_are_stable_sized_and_part_boundaries_matter() -> None:
    assert lock_key32("t", "p") == lock_key32("t", "p")
    assert -(2**31) <= lock_key32("t", "p") < 2**31 and -(2**63) <= lock_key64("t", "k") < 2**63
    assert lock_key32("a/b", "c") != lock_key32("a", "b/c")
    assert lock_key64("t", "k") != lock_key32("t", "k")
