"""Errors stay small enough to read: messages cut short, violations listed up to a cap and counted."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2

from relevans.kit.errors import FieldViolation, InvalidArgument, NotFound
from relevans.kit.status import ERROR_DOMAIN, MAX_MESSAGE, MAX_VIOLATIONS, refusal, to_rpc_status


def _unpack(status: object, kind: type) -> object:
    for detail in status.details:  # type: ignore[attr-defined]
        if detail.Is(kind.DESCRIPTOR):  # type: ignore[attr-defined]
            out = kind()
            detail.Unpack(out)
            return out
    return None


def test_a_message_echoing_a_huge_input_is_cut_short() -> None:
    status = to_rpc_status(NotFound(f"no profile {'x' * 1_000_000!r}"))
    assert len(status.message) == MAX_MESSAGE
    assert status.message.endswith("…")


def test_violations_are_capped_and_the_rest_counted() -> None:
    violations = [FieldViolation(f"condition.node_{i}", "is not a node") for i in range(10_000)]
    status = to_rpc_status(InvalidArgument(violations))
    bad = _unpack(status, error_details_pb2.BadRequest)
    info = _unpack(status, error_details_pb2.ErrorInfo)
    assert isinstance(bad, error_details_pb2.BadRequest) and isinstance(info, error_details_pb2.ErrorInfo)
    listed = len(bad.field_violations)
    assert 0 < listed <= MAX_VIOLATIONS
    assert info.metadata["violations"] == "10000"
    assert info.metadata["violations_listed"] == str(listed)
    assert f"{10_000 - listed} more not listed" in status.message
    assert len(status.SerializeToString()) < 6 * 1024


def test_a_long_field_and_description_are_cut_short() -> None:
    status = to_rpc_status(InvalidArgument(FieldViolation("f" * 5000, "d" * 5000)))
    bad = _unpack(status, error_details_pb2.BadRequest)
    assert isinstance(bad, error_details_pb2.BadRequest)
    (v,) = bad.field_violations
    assert len(v.field) < 200 and len(v.description) <= 200


def test_a_refusal_carries_error_info() -> None:
    status = refusal(grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED", "missing token")
    info = _unpack(status, error_details_pb2.ErrorInfo)
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert (status.code, info.reason, info.domain) == (16, "UNAUTHENTICATED", ERROR_DOMAIN)
