"""Errors -> google.rpc.Status, small enough for any client to read.

Every error a service answers carries an `ErrorInfo` (reason, domain `ERROR_DOMAIN`); an
`INVALID_ARGUMENT` from the domain also a `BadRequest`. Messages, field names and descriptions are
cut to a few hundred characters, and the field violations listed stop at `MAX_VIOLATIONS` or
`VIOLATION_BUDGET` bytes, whichever comes first (ErrorInfo's metadata `violations` then says how
many there were): the status travels in the response trailers, and a gRPC client refuses trailers
over 8-16 KiB ("Stream removed"), so an error that repeated a 1 MB id or listed 10,000 violations
would reach the caller as RESOURCE_EXHAUSTED instead of the error it is.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from relevans.kit import errors

ERROR_DOMAIN = "relevans.dev"
MAX_MESSAGE = 200
MAX_FIELD = 120
MAX_DESCRIPTION = 200
MAX_VIOLATIONS = 100
VIOLATION_BUDGET = 4096  # bytes of BadRequest; about 5.5 KiB once base64-encoded in the trailer

CODES: dict[type[errors.DomainError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
}


def shorten(text: str, limit: int) -> str:
    """`text`, cut to `limit` characters (the last one an ellipsis) when longer."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _packed(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def refusal(
    code: grpc.StatusCode, reason: str, message: str, metadata: dict[str, str] | None = None
) -> status_pb2.Status:
    """A status with `code`, a short `message` and an ErrorInfo of `reason` (and `metadata`)."""
    info = error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata or {})
    return status_pb2.Status(
        code=code.value[0], message=shorten(message, MAX_MESSAGE), details=[_packed(info)]
    )


def _bad_request(violations: list[errors.FieldViolation]) -> error_details_pb2.BadRequest:
    """The first violations, up to MAX_VIOLATIONS and VIOLATION_BUDGET bytes."""
    bad = error_details_pb2.BadRequest()
    size = 0
    for v in violations[:MAX_VIOLATIONS]:
        item = error_details_pb2.BadRequest.FieldViolation(
            field=shorten(v.field, MAX_FIELD), description=shorten(v.description, MAX_DESCRIPTION)
        )
        size += item.ByteSize() + 3
        if size > VIOLATION_BUDGET:
            break
        bad.field_violations.append(item)
    return bad


def to_rpc_status(exc: errors.DomainError) -> status_pb2.Status:
    code = CODES.get(type(exc), grpc.StatusCode.UNKNOWN)
    if not isinstance(exc, errors.InvalidArgument):
        return refusal(code, exc.reason, exc.message)
    bad = _bad_request(exc.violations)
    listed, total = len(bad.field_violations), len(exc.violations)
    message, metadata = exc.message, {}
    if listed < total:
        message = f"{shorten(message, MAX_MESSAGE - 50)} ({total - listed} more not listed)"
        metadata = {"violations": str(total), "violations_listed": str(listed)}
    status = refusal(code, exc.reason, message, metadata)
    status.details.append(_packed(bad))
    return status
