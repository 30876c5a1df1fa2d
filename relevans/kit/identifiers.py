"""The hash by which an erased person's identifiers are remembered (GDPR suppression).

Profile hashes the identifiers it erases and publishes the hashes in `ProfileErased`; delivery
suppresses any address with one of those hashes; a re-import checks them. All three must hash an
identifier the same way, so there is one normalisation: surrounding white space dropped and
letters lower-cased. Emails are case-insensitive in practice and phone numbers are E.164 digits;
a customer id that differs from an erased one only by case is suppressed too, erring on the
side of not contacting someone who asked to be forgotten.
"""

from __future__ import annotations

import hashlib


def normalised_identifier(value: str) -> str:
    return value.strip().lower()


def identifier_hash(value: str) -> str:
    """The sha256 hex of the normalised identifier."""
    return hashlib.sha256(normalised_identifier(value).encode()).hexdigest()
