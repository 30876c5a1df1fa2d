"""List pagination as the AIPs describe it: `page_size` with a default and a maximum, and an opaque
`page_token` that only this service can make and that continues only the listing it came from."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from relevans.kit.errors import FieldViolation, InvalidArgument

_NOT_OURS = "is not a token this service issued"
# The largest position a token may carry: a PostgreSQL bigint.
_MAX_POSITION = 2**63 - 1


@dataclass(frozen=True, slots=True)
class PageSize:
    """A listing's page size rule. Larger than `maximum` is clamped (AIP-158), or refused where the
    listing's contract says so (`refuse_over_maximum`)."""

    default: int
    maximum: int
    refuse_over_maximum: bool = False

    def of(self, requested: int) -> int:
        """The page size to use for `requested`; 0 means the default; negative is invalid."""
        if requested == 0:
            return self.default
        if requested < 0:
            raise InvalidArgument(FieldViolation("page_size", "must not be negative"))
        if requested > self.maximum:
            if self.refuse_over_maximum:
                raise InvalidArgument(FieldViolation("page_size", f"must be between 0 and {self.maximum}"))
            return self.maximum
        return requested


def encode_page_token(**position: str | int) -> str:
    """An opaque token for the next page: the listing's position and its filter, as URL-safe base64."""
    body = json.dumps(position, separators=(",", ":"), sort_keys=True).encode()
    return base64.urlsafe_b64encode(body).decode().rstrip("=")


def decode_page_token(token: str, **expected: type) -> dict[str, Any] | None:
    """The fields of a token `encode_page_token` made with fields of the `expected` types (ints are
    positions: 0 to a bigint's maximum); None for the first page (an empty token); InvalidArgument on
    `page_token` for anything else, forged or altered."""
    if not token:
        return None
    try:
        data = json.loads(base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_", validate=True))
    except (ValueError, binascii.Error):
        raise InvalidArgument(FieldViolation("page_token", _NOT_OURS)) from None
    if not isinstance(data, dict) or data.keys() != expected.keys():
        raise InvalidArgument(FieldViolation("page_token", _NOT_OURS))
    for name, kind in expected.items():
        value = data[name]
        if type(value) is not kind:  # bool is not int here
            raise InvalidArgument(FieldViolation("page_token", _NOT_OURS))
        if isinstance(value, int) and not 0 <= value <= _MAX_POSITION:
            raise InvalidArgument(FieldViolation("page_token", _NOT_OURS))
    return data


def refuse_other_listing(field: str) -> InvalidArgument:
    """The error for a token used with another filter than the listing it came from."""
    return InvalidArgument(FieldViolation("page_token", f"belongs to a listing with another {field}"))
