"""What a template says for a person now, or for given variables: PreviewTemplate and SendTest. Pure.

For a person, the variant is their locale's (the chain in `locales.py`) and the variables are
those a real message gets: their first name by the name rules, their address; the request's
variables add the rest (`event`, ...). Without a person, the variant is the one asked for (by the
same chain, so asking for `de-CH` may render `de`) and the variables are the request's, the first
name sanitized as for a person.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from services.delivery.domain.channels import CHANNELS
from services.delivery.domain.channels.web import MAX_LINK_CHARS
from services.delivery.domain.decision import ProfileView, message_variables, template_variables
from services.delivery.domain.rendering import DEFAULT_LIMITS, Rendered, Renderer
from services.delivery.domain.templates import Template, pick_variant


@dataclass(frozen=True, slots=True)
class Preview:
    # The variant rendered.
    template: Template
    rendered: Rendered
    # Web: the banner's link rendered ("" when the template has none).
    link_url: str = ""


def render_preview(
    variants: Sequence[Template],
    tenant_default: str,
    variables: Mapping[str, Any],
    renderer: Renderer,
    *,
    profile: ProfileView | None = None,
    locale: str = "",
) -> Preview:
    """The variant for `profile` (else for `locale`) rendered; RenderError when it cannot be
    rendered safely. `variants` must not be empty."""
    wanted = profile.locale if profile is not None else locale
    template = pick_variant(variants, wanted, tenant_default)
    if template is None:
        raise ValueError("a template without variants has no preview")
    values = message_variables(variables, profile) if profile is not None else template_variables(variables)
    channel = CHANNELS.get(template.channel)
    limits = channel.limits if channel is not None else DEFAULT_LIMITS
    rendered = renderer.render(template.subject, template.body_text, values, limits)
    link = (
        renderer.render_line("link_url", template.link_url, values, MAX_LINK_CHARS)
        if template.link_url
        else ""
    )
    return Preview(template, rendered, link)
