"""Templates: what a message says, per channel and locale, validated when saved.

Besides compiling, a template is refused when saved when
- its subject holds a CR or LF: the subject becomes a mail header, and a line break there
  would let the text after it become headers of its own (header injection);
- it uses a top-level variable its channel never has (`Channel.variables`): such a template
  could never render. What is below a top-level name (`event.product_name`) is the sender's
  and stays free-form.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from jinja2 import TemplateSyntaxError, meta

from relevans.kit.errors import FieldViolation, InvalidArgument, Violations
from relevans.kit.resource_ids import resource_id_problem
from services.delivery.domain.channels import CHANNELS, SUPPORTED_CHANNELS, Channel
from services.delivery.domain.channels.web import MAX_LINK_CHARS, WEB
from services.delivery.domain.locales import FALLBACK_LOCALE, canonical_locale, locale_problem, pick_locale
from services.delivery.domain.rendering import DEFAULT_LIMITS, Renderer

DEFAULT_LOCALE = FALLBACK_LOCALE
LINE_BREAK_PROBLEM = "must be one line: a CR or LF would end the mail header it goes into"
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
    webhook_endpoint_id: str = ""
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
    # Webhook templates: the endpoint their messages are posted to.
    webhook_endpoint_id: str = ""
    # Web (banner) templates.
    placement: str = ""
    banner_lifetime: timedelta | None = None
    link_url: str = ""


def check_template_id(template_id: str, field: str = "template_id") -> str:
    problem = resource_id_problem(template_id)
    if problem:
        raise InvalidArgument(FieldViolation(field, problem))
    return template_id


def has_line_break(value: str) -> bool:
    return "\r" in value or "\n" in value


def unknown_variables(source: str, channel: Channel, renderer: Renderer) -> list[str]:
    """The top-level variables `source` reads that `channel` never has, in name order."""
    try:
        used = meta.find_undeclared_variables(renderer.parse(source))
    except TemplateSyntaxError:
        return []  # reported as a compile error
    return sorted(used - channel.variables)


def validate_template(
    raw: RawTemplate | None, renderer: Renderer, default_locale: str = DEFAULT_LOCALE
) -> Template:
    """The template to store, or InvalidArgument naming every bad field (`template.body_text`, ...).
    A template without a locale is the `default_locale` variant."""
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
    locale = raw.locale or default_locale or DEFAULT_LOCALE
    problem = locale_problem(locale)
    if problem:
        v.add("template.locale", problem)
    channel = CHANNELS.get(raw.channel)
    # A template for an unknown channel is refused above; its sizes are still checked, against
    # the limits templates had before channels brought their own.
    limits = channel.limits if channel is not None else DEFAULT_LIMITS
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
        if field == "subject" and has_line_break(source):
            v.add(name, LINE_BREAK_PROBLEM)
            continue
        error = renderer.check(source)
        if error:
            v.add(name, f"does not compile: {error}")
            continue
        unknown = unknown_variables(source, channel, renderer) if channel is not None else []
        if unknown:
            names = ", ".join(unknown)
            offered = ", ".join(sorted(channel.variables)) if channel is not None else ""
            v.add(name, f"uses {names}, which {raw.channel} messages never have (they have {offered})")
    if raw.channel == "webhook":
        problem = resource_id_problem(raw.webhook_endpoint_id)
        if problem:
            v.add("template.webhook_endpoint_id", problem)
    if raw.channel == WEB:
        _check_banner(raw, renderer, v)
    v.raise_if_any()
    return Template(
        template_id=raw.template_id,
        channel=raw.channel,
        locale=canonical_locale(locale),
        subject=raw.subject,
        body_text=raw.body_text,
        webhook_endpoint_id=raw.webhook_endpoint_id if raw.channel == "webhook" else "",
        placement=raw.placement if raw.channel == WEB else "",
        banner_lifetime=raw.banner_lifetime if raw.channel == WEB else None,
        link_url=raw.link_url if raw.channel == WEB else "",
    )


def pick_variant(variants: Sequence[Template], wanted: str, tenant_default: str) -> Template | None:
    """The variant a person whose locale is `wanted` gets (the chain in `locales.py`); None when
    there are no variants."""
    by_locale = {t.locale: t for t in variants}
    chosen = pick_locale(list(by_locale), wanted, tenant_default)
    return by_locale[chosen] if chosen is not None else None


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
