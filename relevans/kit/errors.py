"""Errors the domain raises, free of gRPC; `server.py` maps them to google.rpc.Status.

Domain code raises these; servicers never build status codes by hand.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class DomainError(Exception):
    """Base of the errors a caller can act on."""

    reason = "ERROR"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(DomainError):
    """The request is malformed; `violations` name each offending field."""

    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: list[FieldViolation] | FieldViolation, message: str = "") -> None:
        self.violations = [violations] if isinstance(violations, FieldViolation) else list(violations)
        fields = ", ".join(v.field for v in self.violations)
        super().__init__(message or f"invalid fields: {fields}")


class NotFound(DomainError):
    reason = "NOT_FOUND"


class AlreadyExists(DomainError):
    reason = "ALREADY_EXISTS"


class FailedPrecondition(DomainError):
    reason = "FAILED_PRECONDITION"


class Violations:
    """Collects field violations, then raises them all at once."""

    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        self.items.append(FieldViolation(field, description))

    def __bool__(self) -> bool:
        return bool(self.items)

    def raise_if_any(self) -> None:
        if self.items:
            raise InvalidArgument(self.items)


def check_count(field: str, count: int, maximum: int) -> None:
    """Refuse a repeated field with more than `maximum` items before any item is converted or
    checked: one violation for the field, not one per item of a hostile request."""
    if count > maximum:
        raise InvalidArgument(FieldViolation(field, f"at most {maximum} items, got {count}"))
