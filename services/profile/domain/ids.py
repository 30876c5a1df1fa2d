"""Random identifiers, cheaper than `uuid.uuid4()` on the ingest hot path (same format and entropy)."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import datetime


def _version_4() -> bytearray:
    b = bytearray(os.urandom(16))
    b[6] = b[6] & 0x0F | 0x40
    b[8] = b[8] & 0x3F | 0x80
    return b


def uuid4_hex() -> str:
    """A random (version 4) UUID as 32 hex digits, like `uuid.uuid4().hex`."""
    return _version_4().hex()


def random_uuid() -> str:
    """A random (version 4) UUID in its canonical text form, like `str(uuid.uuid4())`."""
    h = _version_4().hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def time_ordered_ids(at: datetime) -> Callable[[], str]:
    """Makes version 7 UUIDs: the milliseconds since the epoch of `at`, then random bits.
    Ids made in time order sort (and index) in time order, so inserting them touches the
    end of an index rather than random pages."""
    prefix = int(at.timestamp() * 1000).to_bytes(6, "big")
    pool = memoryview(b"")

    def make() -> str:
        nonlocal pool
        if not pool:
            pool = memoryview(os.urandom(10 * 64))  # one read of randomness for 64 ids
        b = bytearray(prefix + pool[:10])
        pool = pool[10:]
        b[6] = b[6] & 0x0F | 0x70
        b[8] = b[8] & 0x3F | 0x80
        h = b.hex()
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

    return make
