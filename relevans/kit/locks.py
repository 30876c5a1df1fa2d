"""Keys of PostgreSQL advisory locks derived from names (tenant, person, request).

PostgreSQL takes a lock key as one bigint or two ints. A service that locks many things of one
kind uses its own namespace as the first int and `lock_key32(...)` as the second, so its keys
cannot collide with another kind's; a single bigint key comes from `lock_key64(...)`.
The parts are joined with NUL, which no id contains, so ("a/b", "c") and ("a", "b/c") differ.
"""

from __future__ import annotations

import hashlib


def _key(parts: tuple[str, ...], size: int) -> int:
    digest = hashlib.blake2b("\x00".join(parts).encode(), digest_size=size).digest()
    return int.from_bytes(digest, "big", signed=True)


def lock_key32(*parts: str) -> int:
    """A stable signed 32-bit key: the second half of a two-key lock in a namespace."""
    return _key(parts, 4)


def lock_key64(*parts: str) -> int:
    """A stable signed 64-bit key: a one-key lock."""
    return _key(parts, 8)
