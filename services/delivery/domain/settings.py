"""A tenant's delivery settings, validated when updated."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from relevans.kit.errors import FieldViolation, InvalidArgument
from services.delivery.domain.locales import canonical_locale, locale_problem


@dataclass(frozen=True, slots=True)
class TenantSettings:
    # The locale tried before en in every template's fallback chain; "" means en.
    default_locale: str = ""
    updated_at: datetime | None = None


def validate_settings(settings: TenantSettings | None) -> TenantSettings:
    """The settings to store (the locale in its canonical case), or InvalidArgument naming the field."""
    if settings is None:
        raise InvalidArgument(FieldViolation("settings", "is required"))
    locale = settings.default_locale
    if locale:
        problem = locale_problem(locale)
        if problem:
            raise InvalidArgument(FieldViolation("settings.default_locale", problem))
        locale = canonical_locale(locale)
    return TenantSettings(default_locale=locale)
