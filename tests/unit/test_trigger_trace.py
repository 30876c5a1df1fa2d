"""Which condition-false rows a trigger process writes again, and what it counts meanwhile."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from services.trigger.trace import CollapsedNotes

T0 = datetime(2026, 5, 4, 12, tzinfo=UTC)
KEY = ("shop", "offer\x1fp1\x1fcondition_false")


def test_a_row_is_due_until_a_committed_write_and_again_after_the_refresh() -> None:
    notes = CollapsedNotes(refresh=timedelta(hours=1))
    assert notes.due(KEY, T0)
    notes.settle([(KEY, T0)], [])
    assert not notes.due(KEY, T0 + timedelta(minutes=59))
    assert notes.due(KEY, T0 + timedelta(hours=1))


def test_what_is_held_is_counted_and_added_to_the_next_write() -> None:
    notes = CollapsedNotes()
    notes.settle([(KEY, T0)], [])
    notes.settle([], [(KEY, 3)])
    notes.settle([], [(KEY, 2)])
    assert notes.counted(KEY) == 5
    notes.settle([(KEY, T0 + timedelta(hours=2))], [])
    assert notes.counted(KEY) == 0


def test_a_write_that_never_committed_leaves_the_row_due() -> None:
    notes = CollapsedNotes()
    # `record` returned its settlement, the transaction rolled back: nothing was settled.
    assert notes.due(KEY, T0)
    notes.settle([], [(KEY, 4)])  # held while never written: nothing to add it to
    assert notes.counted(KEY) == 0


def test_the_least_recently_written_rows_are_forgotten_beyond_the_capacity() -> None:
    notes = CollapsedNotes(capacity=2)
    a, b, c = (("shop", k) for k in "abc")
    notes.settle([(a, T0), (b, T0)], [])
    notes.settle([], [(a, 1)])
    notes.settle([(c, T0)], [])
    assert notes.due(a, T0) and notes.counted(a) == 0
    assert not notes.due(b, T0) and not notes.due(c, T0)
