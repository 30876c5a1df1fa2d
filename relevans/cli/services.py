"""Names the three services' builders, so the CLI and tests start them the same way."""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable

from relevans.kit.clock import Clock
from relevans.kit.server import ServiceHost
from relevans.kit.settings import SERVICES, Settings

Builder = Callable[[Settings, Clock], Awaitable[ServiceHost]]


def builder(service: str) -> Builder:
    if service not in SERVICES:
        raise ValueError(f"unknown service {service!r}; choose from {', '.join(SERVICES)}")
    module = importlib.import_module(f"services.{service}.app")
    build: Builder = module.build
    return build
