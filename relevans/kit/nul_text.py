"""Text PostgreSQL cannot store: a NUL character (U+0000) in a `text` or `jsonb` value.

Checking every string of every request for NUL would cost the ingest path on every call, so the
database's refusal is the check: a statement that fails for this reason (SQLSTATE 22021 or
22P05) rolled back its transaction, and the call answers INVALID_ARGUMENT naming the request's
fields that hold a NUL, found by walking the request only then.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from google.protobuf.message import Message

from relevans.kit.errors import FieldViolation, InvalidArgument

# character_not_in_repertoire (a NUL in text), untranslatable_character (\u0000 in jsonb)
_NUL_SQLSTATES = frozenset({"22021", "22P05"})
DESCRIPTION = "must not contain a NUL character (U+0000)"


def is_nul_refusal(exc: BaseException) -> bool:
    """Whether `exc`, or an exception it was raised from, is PostgreSQL refusing a NUL."""
    seen: BaseException | None = exc
    for _ in range(8):  # a driver's error wrapped by SQLAlchemy is two or three links deep
        if seen is None:
            return False
        if getattr(seen, "sqlstate", None) in _NUL_SQLSTATES:
            return True
        seen = seen.__cause__ or getattr(seen, "orig", None)
    return False


def _holds_nul(value: object) -> bool:
    return isinstance(value, str) and "\x00" in value


def nul_fields(message: Message, path: str = "") -> Iterator[str]:
    """The paths of `message`'s strings (and map keys) that hold a NUL, e.g. `event.properties.a`;
    inside a Struct the path is the JSON one (`properties.tags[2]`), as validation names it."""
    name = message.DESCRIPTOR.full_name
    if name == "google.protobuf.Struct":
        fields = message.fields  # type: ignore[attr-defined]
        entries: Iterator[tuple[str, object, object]] = ((f"{path}.{k}", k, fields[k]) for k in fields)
    elif name == "google.protobuf.ListValue":
        entries = ((f"{path}[{i}]", None, v) for i, v in enumerate(message.values))  # type: ignore[attr-defined]
    elif name == "google.protobuf.Value":
        kind = message.WhichOneof("kind")
        entries = iter([(path, None, getattr(message, kind))] if kind else [])
    else:
        entries = _entries(message, path)
    for where, key, item in entries:
        if _holds_nul(key) or _holds_nul(item):
            yield where
        elif isinstance(item, Message):
            yield from nul_fields(item, where)


def _entries(message: Message, path: str) -> Iterator[tuple[str, object, object]]:
    """(path, map key or None, value) of each set field of an ordinary message."""
    for field, value in message.ListFields():
        at = f"{path}.{field.name}" if path else field.name
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            yield from ((f"{at}.{key}", key, value[key]) for key in value)
        elif field.is_repeated:
            yield from ((f"{at}[{i}]", None, item) for i, item in enumerate(value))
        else:
            yield at, None, value


def nul_refusal(request: Any) -> InvalidArgument:
    """The INVALID_ARGUMENT for a request PostgreSQL refused for a NUL (the whole request is named
    when it is a stream, whose messages are gone)."""
    paths = list(nul_fields(request)) if isinstance(request, Message) else []
    return InvalidArgument([FieldViolation(p, DESCRIPTION) for p in paths or ["request"]])
