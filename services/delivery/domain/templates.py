"""Templates: what a message says, per channel and locale, validated when saved."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from relevans.kit.errors import FieldViolation, InvalidArgument, Violations
from relevans.kit.resource_ids import resource_id_problem
from services.delivery.domain.channels import CHANNELS, SUPPORTED_CHANNELS
from services.delivery.domain.channels.web import MAX_LINK_CHARS, WEB
from services.delivery.domain.rendering import DEFAULT_LIMITS, Renderer

# BCP 47 in the shape people use: en, de-CH, zh-Hant-TW, es-419.
LOCALE_RE = re.compile(r"^[A-Za-z]{2,3}(?:-[A-Za-z0-9]{2,8})*$")
DEFAULT_LOCALE = "en"
# Web templates: how long a placed banner may stay eligible at most.
MAX_BANNER_LIFETIME = timedelta(days=90)


@dataclass(frozen=True, slots=True)
class RawTemplate:
    """A template as a client sent it; channel is the lower-case enum name ("email", "unspecified")."""

    template_id: str = ""
    channel: str = ""
    locale: str = ""
    subject: str = ""
    body_text: str = ""
    # Web (banner) templates; None when the lifetime is unset or not a valid duration.
    placement: str = ""
    banner_lifetime: timedelta | None = None
    link_url: str = ""


@dataclass(frozen=True, slots=True)
class Template:
    template_id: str
    channel: str
    locale: str
    subject: str
    body_text: str
    updated_at: datetime | None = None
    placement: str = ""
    banner_lifetime: timedelta | None = None
    link_url: str = ""


def check_template_id(template_id: str, field: str = "template_id") -> str:
    problem = resource_id_problem(template_id)
    if problem:
        raise InvalidArgument(FieldViolation(field, problem))
    return template_id


def validate_template(raw: RawTemplate | None, renderer: Renderer) -> Template:
    """The template to store, or InvalidArgument naming every bad field (`template.body_text`, ...)."""
    if raw is None:
        raise InvalidArgument(FieldViolation("template", "is required"))
    v = Violations()
    problem = resource_id_problem(raw.template_id)
    if problem:
        v.add("template.template_id", problem)
    if raw.channel in ("", "unspecified"):
        v.add("template.channel", "is required")
    elif raw.channel not in SUPPORTED_CHANNELS:
        names = ", ".join(f"CHANNEL_{c.upper()}" for c in sorted(SUPPORTED_CHANNELS))
        v.add("template.channel", f"only {names} templates are supported")
    locale = raw.locale or DEFAULT_LOCALE
    if not LOCALE_RE.match(locale):
        v.add("template.locale", "must be a BCP 47 language tag such as en or de-CH")
    # A template for an unknown channel is refused above; its sizes are still checked, against
    # the limits templates had before channels brought their own.
    limits = CHANNELS[raw.channel].limits if raw.channel in CHANNELS else DEFAULT_LIMITS
    for field, source, limit in (
        ("subject", raw.subject, limits.subject_source_bytes),
        ("body_text", raw.body_text, limits.body_source_bytes),
    ):
        name = f"template.{field}"
        if not source.strip():
            v.add(name, "is required")
            continue
        if len(source.encode()) > limit:
            v.add(name, f"must be at most {limit} bytes")
            continue
        error = renderer.check(source)
        if error:
            v.add(name, f"does not compile: {error}")
    if raw.channel == WEB:
        _check_banner(raw, renderer, v)
    v.raise_if_any()
    return Template(
        template_id=raw.template_id,
        channel=raw.channel,
        locale=locale,
        subject=raw.subject,
        body_text=raw.body_text,
        placement=raw.placement if raw.channel == WEB else "",
        banner_lifetime=raw.banner_lifetime if raw.channel == WEB else None,
        link_url=raw.link_url if raw.channel == WEB else "",
    )


def _check_banner(raw: RawTemplate, renderer: Renderer, v: Violations) -> None:
    """A banner needs the page slot it shows in and how long it stays; its link must compile."""
    problem = resource_id_problem(raw.placement)
    if problem:
        v.add("template.placement", problem)
    lifetime = raw.banner_lifetime
    if lifetime is None:
        v.add("template.banner_lifetime", "is required for CHANNEL_WEB templates (a positive duration)")
    elif not timedelta(0) < lifetime <= MAX_BANNER_LIFETIME:
        v.add("template.banner_lifetime", f"must be positive and at most {MAX_BANNER_LIFETIME.days} days")
    if raw.link_url:
        if len(raw.link_url) > MAX_LINK_CHARS:
            v.add("template.link_url", f"must be at most {MAX_LINK_CHARS} characters")
        else:
            error = renderer.check(raw.link_url)
            if error:
                v.add("template.link_url", f"does not compile: {error}")
