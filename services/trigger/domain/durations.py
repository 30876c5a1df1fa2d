"""Durations as exact text, the way protobuf JSON writes them ("14400s", "1.5s"): what stored
definitions and policies hold, so a stored duration reads back to the same microsecond."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal


def duration_text(d: timedelta) -> str:
    """A duration as exact decimal seconds with an `s` ("14400s", "1.5s", "-2s")."""
    us = (d.days * 86_400 + d.seconds) * 1_000_000 + d.microseconds
    sign = "-" if us < 0 else ""
    seconds, fraction = divmod(abs(us), 1_000_000)
    return sign + f"{seconds}.{fraction:06d}".rstrip("0").rstrip(".") + "s"


def parse_duration(text: str) -> timedelta:
    """The inverse of `duration_text`."""
    return timedelta(microseconds=int(Decimal(text.removesuffix("s")) * 1_000_000))
