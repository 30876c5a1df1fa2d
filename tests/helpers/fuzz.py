"""Hypothesis strategies for fuzzing any RPC from its descriptors: requests as the bytes on the wire
and credentials as the metadata, so tests/e2e/test_fuzz.py knows no method by name.

A request is written field by field from the request type's descriptor (protobuf's wire format,
written here rather than through the message classes so it can also be what those refuse to make):
mostly well-formed values a caller might send (boundary numbers, unknown enum numbers, control
characters, ids the test seeded, forged page tokens, NaN), sometimes a wrong wire type, invalid
UTF-8 in a string, a field the type does not have, a thousand copies of an item; or random bytes,
a byte-level mutation of a well-formed request, a message nested hundreds deep along a type that
contains itself (Struct and Value), a huge string, or more bytes than any server takes.
"""

from __future__ import annotations

import base64
import json
import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import strategies as st

from relevans.kit.auth import SCOPES, mint_token
from tests.helpers.auth import TEST_SECRET

VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5
# More bytes than any service takes in one message (the gRPC limit is 8 MiB).
OVERSIZE = 9 * 1024 * 1024
# How deep a well-formed request nests messages; deeper ones come from `deep`.
MAX_DEPTH = 3

_INT_BOUNDARIES = [0, 1, -1, 2, 127, 128, 1000, 1001, 10_000, 2**31 - 1, -(2**31), 2**32 - 1, 2**32]
_INT_BOUNDARIES += [2**53, 2**53 + 1, 2**63 - 1, -(2**63), 2**64 - 1]
_DOUBLES = [0.0, -0.0, 1.0, -1.0, 0.5, 1e308, -1e308, 5e-324, float("nan"), float("inf"), float("-inf")]
_DOUBLES += [2.0**53, 2.0**53 + 2, 2.0**63, 2.0**64, 1e30]
_SCALAR_WIRE = {
    FieldDescriptor.TYPE_DOUBLE: FIXED64,
    FieldDescriptor.TYPE_FIXED64: FIXED64,
    FieldDescriptor.TYPE_SFIXED64: FIXED64,
    FieldDescriptor.TYPE_FLOAT: FIXED32,
    FieldDescriptor.TYPE_FIXED32: FIXED32,
    FieldDescriptor.TYPE_SFIXED32: FIXED32,
    FieldDescriptor.TYPE_STRING: LENGTH,
    FieldDescriptor.TYPE_BYTES: LENGTH,
    FieldDescriptor.TYPE_MESSAGE: LENGTH,
}
_INVALID_UTF8 = [b"\xff", b"\xc3(", b"\xed\xa0\x80", b"a\x80b", b"\xf4\x90\x80\x80", b"\xc0\xaf"]
_TEMPLATES = [
    "{{ first_name }}",
    "{{ ''.__class__.__mro__ }}",
    "{% for i in range(10**9) %}x{% endfor %}",
    "{{ 'a' * 10**9 }}",
    "{{",
    "{% raw %}",
]
_WEIRD_TEXT = ["", " ", "\x00", "a\x00b", "\r\n", "Ann\r\nBcc: x@y.z", "é", "\u202e", "null", "-1", "0", "*"]
_WEIRD_TEXT += ["a@b.c", "not-an-email", "x" * 64, "x" * 65, "x" * 256, "x" * 1025, "traits.score"]


def varint(n: int) -> bytes:
    n &= 2**64 - 1  # negative numbers are ten bytes of two's complement, as protobuf writes them
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def tag(number: int, wire: int) -> bytes:
    return varint(number << 3 | wire)


def length_delimited(number: int, payload: bytes) -> bytes:
    return tag(number, LENGTH) + varint(len(payload)) + payload


@dataclass(frozen=True)
class Request:
    """What one fuzzed call sends: its messages' bytes (one unless the method streams requests) and
    how they were made."""

    messages: tuple[bytes, ...]
    kind: str

    @property
    def size(self) -> int:
        return sum(len(m) for m in self.messages)

    def sample(self, limit: int = 160) -> str:
        shown = [m[:limit].hex() + ("…" if len(m) > limit else "") for m in self.messages[:3]]
        return f"{self.kind}, {self.size} bytes: {' | '.join(shown)}"


@dataclass(frozen=True)
class Credentials:
    """The metadata of one call and what it should get: `valid` (the tenant and a scope that
    allows the method), `denied` (a real token without the scope) or `bad` (no usable token)."""

    kind: str
    expect: str
    metadata: tuple[tuple[str, str], ...]


def _zigzag(n: int, bits: int) -> int:
    return (n << 1) ^ (n >> (bits - 1))


def _scalar(field: FieldDescriptor, value: int | float) -> bytes:
    """The payload of a number field, in the field's own encoding (out-of-range values wrap)."""
    t = field.type
    if t == FieldDescriptor.TYPE_DOUBLE:
        return struct.pack("<d", float(value))
    if t == FieldDescriptor.TYPE_FLOAT:
        f = float(value)
        return struct.pack("<f", f if abs(f) <= 3.4e38 or f != f else float("inf"))
    n = int(value) if value == value and abs(value) != float("inf") else 0
    if t in (FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64):
        return struct.pack("<Q", n & (2**64 - 1))
    if t in (FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_SFIXED32):
        return struct.pack("<I", n & (2**32 - 1))
    if t == FieldDescriptor.TYPE_SINT32:
        return varint(_zigzag(max(-(2**31), min(n, 2**31 - 1)), 32))
    if t == FieldDescriptor.TYPE_SINT64:
        return varint(_zigzag(max(-(2**63), min(n, 2**63 - 1)), 64))
    return varint(n)


def _numbers(field: FieldDescriptor) -> st.SearchStrategy[int | float]:
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.one_of(st.sampled_from(_DOUBLES), st.floats())
    if field.type == FieldDescriptor.TYPE_BOOL:
        return st.sampled_from([0, 1, 2, 2**64 - 1])
    if field.type == FieldDescriptor.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.sampled_from([-1, 99, 2**31 - 1, -(2**31)]))
    return st.one_of(st.sampled_from(_INT_BOUNDARIES), st.integers(-(2**63), 2**64 - 1))


def _forged_page_tokens() -> st.SearchStrategy[str]:
    """Page tokens in the services' own shape (URL-safe base64 of a JSON object, with the keys the
    listings issue: relevans/kit/paging.py's callers) or another, holding positions no service
    issues: out of a bigint's range, negative, of the wrong type."""
    values = st.one_of(
        st.sampled_from([2**63, 10**30, -1, 2**63 - 1, 1.5, True, None, "", "\x00", [], {}]),
        st.integers(),
        st.text(max_size=10),
    )
    issued = st.one_of(
        st.fixed_dictionaries({"before": values, "profile": values}),
        st.fixed_dictionaries({"after": values}),
    )
    other = st.dictionaries(st.sampled_from(["before", "after", "profile", "id"]), values, max_size=3)
    as_token = st.one_of(issued, other).map(
        lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).decode().rstrip("=")
    )
    return st.one_of(as_token, st.sampled_from(["!", "e30", "W10", "bnVsbA", "=" * 8]), st.text(max_size=12))


def _huge_text() -> st.SearchStrategy[str]:
    return st.builds(
        lambda c, n: c * n, st.sampled_from(["a", "é", "\x00", "{"]), st.sampled_from([70_000, 2**20])
    )


def _text(field: FieldDescriptor, pool: Sequence[str]) -> st.SearchStrategy[bytes]:
    """A string field's payload: mostly valid UTF-8 (ids the test seeded, odd and huge text,
    templates, forged page tokens where the field is one), sometimes bytes that are not UTF-8."""
    plausible: list[st.SearchStrategy[str]] = [
        st.sampled_from(list(pool) + _WEIRD_TEXT),
        st.text(max_size=24),
    ]
    if field.name.endswith("page_token"):
        plausible = [_forged_page_tokens()]
    if "body" in field.name or "subject" in field.name:
        plausible.append(st.sampled_from(_TEMPLATES))
    text = st.one_of(*plausible).map(str.encode)
    return st.integers(0, 99).flatmap(
        lambda roll: (
            text
            if roll < 85
            else st.sampled_from(_INVALID_UTF8)
            if roll < 93
            else _huge_text().map(str.encode)
        )
    )


def _payload(field: FieldDescriptor, depth: int, pool: Sequence[str]) -> st.SearchStrategy[bytes]:
    """One value of `field`, encoded with its tag."""
    wire = _SCALAR_WIRE.get(field.type, VARINT)
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        inner = message(field.message_type, pool, depth + 1) if depth < MAX_DEPTH else st.just(b"")
        return inner.map(lambda b: length_delimited(field.number, b))
    if field.type == FieldDescriptor.TYPE_STRING:
        return _text(field, pool).map(lambda b: length_delimited(field.number, b))
    if field.type == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64).map(lambda b: length_delimited(field.number, b))
    return _numbers(field).map(lambda n: tag(field.number, wire) + _scalar(field, n))


def _wrong_wire(field: FieldDescriptor) -> st.SearchStrategy[bytes]:
    """`field` sent with another wire type than its own, or with a length past the end."""
    right = _SCALAR_WIRE.get(field.type, VARINT)
    bodies = {
        VARINT: varint(2**70 % 2**64),
        FIXED64: b"\x01" * 8,
        LENGTH: varint(3) + b"abc",
        FIXED32: b"\x01" * 4,
    }
    wrong = [tag(field.number, w) + body for w, body in bodies.items() if w != right]
    wrong.append(tag(field.number, LENGTH) + varint(1000) + b"short")
    wrong.append(tag(field.number, 3))  # a group start that never ends
    return st.sampled_from(wrong)


def _field(field: FieldDescriptor, depth: int, pool: Sequence[str]) -> st.SearchStrategy[bytes]:
    one = _payload(field, depth, pool)
    if not field.is_repeated:
        values = one
    else:
        few = st.lists(one, min_size=1, max_size=3).map(b"".join)
        # many copies of one small item: counts past the limits without megabytes of input
        many = st.tuples(one, st.sampled_from([101, 1001, 10_001])).map(
            lambda t: t[0] * (t[1] if len(t[0]) * t[1] < 2**20 else 2)
        )
        values = st.one_of(few, many)
    return st.integers(0, 99).flatmap(lambda roll: values if roll < 95 else _wrong_wire(field))


@st.composite
def message(draw: st.DrawFn, descriptor: Descriptor, pool: Sequence[str], depth: int = 0) -> bytes:
    """A message of `descriptor`'s type: each field set or not, plus at times a field it lacks."""
    out = bytearray()
    for field in descriptor.fields:
        if draw(st.booleans()):
            out += draw(_field(field, depth, pool))
    if draw(st.integers(0, 19)) == 0:
        out += length_delimited(draw(st.integers(1000, 2**29 - 1)), b"unknown")
    return bytes(out)


def recursion(descriptor: Descriptor) -> tuple[list[FieldDescriptor], list[FieldDescriptor]] | None:
    """The message fields from `descriptor` to the nearest type that contains itself, and the
    fields of that cycle; None when no such type is reachable."""
    seen: set[str] = set()
    queue: deque[tuple[Descriptor, list[FieldDescriptor]]] = deque([(descriptor, [])])
    while queue:
        current, path = queue.popleft()
        if current.full_name in seen:
            continue
        seen.add(current.full_name)
        cycle = _cycle_from(current)
        if cycle:
            return path, cycle
        queue.extend((f.message_type, [*path, f]) for f in current.fields if f.message_type is not None)
    return None


def _cycle_from(start: Descriptor) -> list[FieldDescriptor] | None:
    stack: list[tuple[Descriptor, list[FieldDescriptor]]] = [(start, [])]
    visited = {start.full_name}
    while stack:
        current, path = stack.pop()
        for f in current.fields:
            if f.message_type is None:
                continue
            if f.message_type.full_name == start.full_name:
                return [*path, f]
            if f.message_type.full_name not in visited:
                visited.add(f.message_type.full_name)
                stack.append((f.message_type, [*path, f]))
    return None


def _wrap(fields: Sequence[FieldDescriptor], payload: bytes) -> bytes:
    for field in reversed(fields):
        payload = length_delimited(field.number, payload)
    return payload


def nested(descriptor: Descriptor, rounds: int) -> bytes | None:
    """A request whose self-containing type nests `rounds` times; None if it has none."""
    found = recursion(descriptor)
    if found is None:
        return None
    path, cycle = found
    payload = b""
    for _ in range(rounds):
        payload = _wrap(cycle, payload)
    return _wrap(path, payload)


def strings(descriptor: Descriptor, value: bytes) -> bytes:
    """A request whose every top-level string field (one item of a repeated one) is `value`."""
    return b"".join(
        length_delimited(f.number, value) for f in descriptor.fields if f.type == FieldDescriptor.TYPE_STRING
    )


def oversize() -> bytes:
    """A request larger than the gRPC limit: its first field, a string of OVERSIZE bytes."""
    return length_delimited(1, b"a" * OVERSIZE)


Kind = tuple[str, st.SearchStrategy[bytes]]  # how a request is made, and the strategy making it


def requests(descriptor: Descriptor, pool: Sequence[str], streaming: bool) -> st.SearchStrategy[Request]:
    """Requests for a method taking `descriptor`: one message, or a few when it streams requests."""
    well_formed = message(descriptor, pool)
    mutated = st.tuples(
        well_formed, st.integers(0, 2**16), st.binary(min_size=1, max_size=4), st.integers(0, 2)
    ).map(_mutate)
    kinds: list[Kind] = [
        ("well-formed", well_formed),
        ("mutated", mutated),
        ("random bytes", st.binary(max_size=256)),
    ]
    if recursion(descriptor) is not None:
        deep = st.sampled_from([3, 9, 33, 34, 100, 300]).map(lambda n: nested(descriptor, n) or b"")
        kinds.append(("deep", deep))
    weights = [55, 20, 15, 10][: len(kinds)]
    pick = st.integers(0, sum(weights) - 1).map(lambda roll: _weighted(kinds, weights, roll))
    single = pick.flatmap(lambda chosen: chosen[1].map(lambda b: (chosen[0], b)))
    if not streaming:
        return single.map(lambda kb: Request((kb[1],), kb[0]))
    return st.lists(single, max_size=3).map(
        lambda items: Request(tuple(b for _, b in items), "+".join(k for k, _ in items) or "empty stream")
    )


def _weighted(kinds: list[Kind], weights: list[int], roll: int) -> Kind:
    for kind, weight in zip(kinds, weights, strict=True):
        if roll < weight:
            return kind
        roll -= weight
    return kinds[-1]


def _mutate(args: tuple[bytes, int, bytes, int]) -> bytes:
    """A well-formed request with bytes overwritten, cut short or inserted at one place."""
    data, at, chunk, how = args
    at = at % (len(data) + 1)
    if how == 0:
        return data[:at] + chunk + data[at + len(chunk) :]
    if how == 1:
        return data[:at]
    return data[:at] + chunk + data[at:]


def credentials(scope: str, tenant: str, other_tenant: str, now: datetime) -> st.SearchStrategy[Credentials]:
    """Mostly a token of `tenant` whose scope allows the method; else another tenant's, one without
    the scope, or none usable: missing, not bearer, forged, tampered, expired, garbage."""

    def bearer(token: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {token}"),)

    own = mint_token(TEST_SECRET, tenant, [scope])
    head, _, signature = own.rpartition(".")
    claims = base64.urlsafe_b64encode(json.dumps({"ten": other_tenant, "scp": ["admin"]}).encode())
    tampered = f"rv1.{claims.decode().rstrip('=')}.{signature}"
    bad = {
        "missing": (),
        "empty bearer": (("authorization", "Bearer "),),
        "basic": (("authorization", "Basic YWRtaW46YWRtaW4="),),
        "forged": bearer(mint_token("not-the-secret", tenant, ["admin"])),
        "tampered": bearer(tampered),
        "expired": bearer(mint_token(TEST_SECRET, tenant, ["admin"], expires_at=now - timedelta(seconds=1))),
        "truncated": bearer(head),
    }
    choices = [Credentials("own tenant", "valid", bearer(own))]
    choices.append(Credentials("admin", "valid", bearer(mint_token(TEST_SECRET, tenant, ["admin"]))))
    choices.append(
        Credentials("other tenant", "valid", bearer(mint_token(TEST_SECRET, other_tenant, ["admin"])))
    )
    if scope != "admin":
        denied = [s for s in SCOPES if s not in (scope, "admin")]
        choices += [
            Credentials(f"scope {s}", "denied", bearer(mint_token(TEST_SECRET, tenant, [s]))) for s in denied
        ]
    choices += [Credentials(name, "bad", md) for name, md in bad.items()]
    garbage = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40).map(
        lambda t: Credentials("garbage", "bad", bearer(t))
    )
    return st.integers(0, 99).flatmap(
        lambda roll: (
            st.sampled_from(choices[:3]) if roll < 70 else st.one_of(st.sampled_from(choices[3:]), garbage)
        )
    )
