"""Unit tests of naming the fields that hold a NUL PostgreSQL refused (relevans.kit.nul_text)."""

from __future__ import annotations

import asyncpg

from relevans.kit.nul_text import is_nul_refusal, nul_fields, nul_refusal
from relevans.profile.v1 import profile_pb2


def test_the_fields_holding_a_nul_are_named_by_path() -> None:
    event = profile_pb2.Event(type="page_view", email="a\x00@example.com")
    event.properties.update({"ok": "fine", "bad": "x\x00y", "nested": {"deep": ["a", "b\x00"]}})
    request = profile_pb2.BatchTrackRequest(events=[profile_pb2.Event(type="ok"), event])
    assert sorted(nul_fields(request)) == [
        "events[1].email",
        "events[1].properties.bad",
        "events[1].properties.nested.deep[1]",
    ]
    clean = profile_pb2.TrackRequest(event=profile_pb2.Event(type="page_view", email="a@example.com"))
    assert list(nul_fields(clean)) == []


def test_a_refusal_names_the_fields_or_the_whole_stream() -> None:
    refusal = nul_refusal(profile_pb2.GetProfileRequest(profile_id="p\x00"))
    assert [(v.field, v.description) for v in refusal.violations] == [
        ("profile_id", "must not contain a NUL character (U+0000)")
    ]
    assert [v.field for v in nul_refusal(object()).violations] == ["request"]


def test_only_postgresqls_nul_refusals_are_recognised_through_wrapping() -> None:
    driver = asyncpg.exceptions.CharacterNotInRepertoireError("invalid byte sequence for encoding UTF8: 0x00")

    class Wrapped(Exception):
        orig: BaseException

    wrapped = Wrapped("wrapped")
    wrapped.orig = RuntimeError("adapter")
    wrapped.orig.__cause__ = driver
    assert is_nul_refusal(driver) and is_nul_refusal(wrapped)
    assert not is_nul_refusal(asyncpg.exceptions.UniqueViolationError("duplicate"))
    assert not is_nul_refusal(ValueError("x\x00"))
