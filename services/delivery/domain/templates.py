"""Templates: what a message says, per channel and locale, validated when saved."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from relevans.kit.errors import FieldViolation, InvalidArgument, Violations
from relevans.kit.resource_ids import resource_id_problem
from services.delivery.domain.channels import CHANNELS, SUPPORTED_CHANNELS
from services.delivery.domain.rendering import DEFAULT_LIMITS, Renderer

# BCP 47 in the shape people use: en, de-CH, zh-Hant-TW, es-419.
LOCALE_RE = re.compile(r"^[A-Za-z]{2,3}(?:-[A-Za-z0-9]{2,8})*$")
DEFAULT_LOCALE = "en"


@dataclass(frozen=True, slots=True)
class RawTemplate:
    """A template as a client sent it; channel is the lower-case enum name ("email", "unspecified")."""

    template_id: str = ""
    channel: str = ""
    locale: str = ""
    subject: str = ""
    body_text: str = ""
    webhook_endpoint_id: str = ""


@dataclass(frozen=True, slots=True)
class Template:
    template_id: str
    channel: str
    locale: str
    subject: str
    body_text: str
    updated_at: datetime | None = None
    # Webhook templates: the endpoint their messages are posted to.
    webhook_endpoint_id: str = ""


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
        if field == "subject" and not limits.has_subject:
            if source:
                v.add(name, f"must be empty: {raw.channel} messages have no subject")
            continue
        if not source.strip():
            v.add(name, "is required")
            continue
        if len(source.encode()) > limit:
            v.add(name, f"must be at most {limit} bytes")
            continue
        error = renderer.check(source)
        if error:
            v.add(name, f"does not compile: {error}")
    if raw.channel == "webhook":
        problem = resource_id_problem(raw.webhook_endpoint_id)
        if problem:
            v.add("template.webhook_endpoint_id", problem)
    v.raise_if_any()
    return Template(
        template_id=raw.template_id,
        channel=raw.channel,
        locale=locale,
        subject=raw.subject,
        body_text=raw.body_text,
        webhook_endpoint_id=raw.webhook_endpoint_id if raw.channel == "webhook" else "",
    )
