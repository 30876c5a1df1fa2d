"""The send decision: may this person get this message now, and what does it say?

Pure: the worker fetches the profile (with its current consent) and the template, and
this module decides SEND, SUPPRESSED or FAILED, with a stable reason code. Which
address the message goes to, and whether it can take one, is the channel's to say
(`domain/channels/`); how a message moves between states is in `states.py`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from relevans.kit.resource_ids import resource_id_problem
from services.delivery.domain.banners import BannerContent
from services.delivery.domain.channels import CHANNELS, SUPPORTED_CHANNELS
from services.delivery.domain.channels.web import MAX_BODY_CHARS, MAX_LINK_CHARS, WEB
from services.delivery.domain.names import clean_first_name
from services.delivery.domain.rendering import Rendered, Renderer, RenderError
from services.delivery.domain.states import FAILED, SUPPRESSED, Final
from services.delivery.domain.templates import Template

# Stable reason codes (a detail may follow after ": ").
ACCEPTED = "accepted"
PROFILE_NOT_FOUND = "profile_not_found"
CONSENT_MISSING = "consent_missing"
CONSENT_WITHDRAWN = "consent_withdrawn"
TEMPLATE_NOT_FOUND = "template_not_found"
TEMPLATE_CHANNEL_MISMATCH = "template_channel_mismatch"
CHANNEL_UNSUPPORTED = "channel_unsupported"
INVALID_REQUEST = "invalid_request"
# The address belongs to a person erased under GDPR.
ERASED = "erased"

TRANSACTIONAL = "transactional"
GRANTED = "granted"
WITHDRAWN_STATUSES = frozenset({"withdrawn", "denied"})
# Variables the service sets itself; a request cannot override them.
RESERVED_VARIABLES = ("first_name", "email")
MAX_IDEMPOTENCY_KEY_CHARS = 512
MAX_ID_CHARS = 256


@dataclass(frozen=True, slots=True)
class ProfileView:
    """What delivery needs of a profile at send time."""

    profile_id: str
    email: str = ""
    first_name: str = ""
    # (purpose, channel) -> status, lower-case enum names: ("marketing", "email") -> "granted".
    consents: Mapping[tuple[str, str], str] = field(default_factory=dict)
    # The profile's phone (imported, E.164) or else its `phone` trait (the SMS channel checks it).
    phone: str = ""
    # The `locale` trait (BCP 47), "" when unknown: which template variant the person gets.
    locale: str = ""
    # The person's anonymous ids (a banner asked for by one of them is theirs).
    anonymous_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class DeliveryRequest:
    """A decoded `relevans.delivery.v1.DeliveryRequest`; enums as lower-case names."""

    idempotency_key: str
    tenant_id: str
    profile_id: str
    trigger_id: str
    channel: str
    purpose: str
    template_id: str
    variables: Mapping[str, Any] = field(default_factory=dict)
    # Which attempt at sending the message this is (1 = first); the worker counts them on the row.
    attempt: int = 1
    # The trigger's priority (a banner of higher priority shows first).
    priority: int = 0
    # When the moment passes (a banner expires then at the latest); None: the template decides.
    expire_at: datetime | None = None
    # When the trigger asked (a withdrawal of the moment from then on withdraws its banner).
    requested_at: datetime | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.tenant_id, self.idempotency_key)


@dataclass(frozen=True, slots=True)
class Send:
    recipient: str
    subject: str
    body_text: str
    # What the message answers and what it was rendered from, for transports whose message
    # carries more than the text (a webhook's payload and endpoint).
    # (Not part of a Send's equality: two sends of the same content are the same message.)
    request: DeliveryRequest | None = field(default=None, compare=False)
    template: Template | None = field(default=None, compare=False)
    # Whose message it is: its tracking links name the tenant.
    tenant_id: str = ""
    # Web: where and how long the banner shows.
    banner: BannerContent | None = None


Decision = Send | Final


def request_problem(r: DeliveryRequest) -> str | None:
    """Why a request can never be sent (recorded as FAILED "invalid_request: ..."), or None."""
    if not r.profile_id:
        return f"{INVALID_REQUEST}: profile_id is required"
    if len(r.profile_id) > MAX_ID_CHARS or len(r.trigger_id) > MAX_ID_CHARS:
        return f"{INVALID_REQUEST}: ids may be at most {MAX_ID_CHARS} characters"
    problem = resource_id_problem(r.template_id)
    if problem:
        return f"{INVALID_REQUEST}: template_id {problem}"
    if r.purpose in ("", "unspecified"):
        return f"{INVALID_REQUEST}: purpose is required"
    if r.channel not in SUPPORTED_CHANNELS:
        return f"{CHANNEL_UNSUPPORTED}: {r.channel or 'unspecified'}"
    return None


def recipient_check(purpose: str, channel: str, profile: ProfileView | None) -> Final | None:
    """SUPPRESSED with its reason when this person must not get this message now, else None
    (FAILED for a channel that is not registered)."""
    if profile is None:
        return Final(SUPPRESSED, PROFILE_NOT_FOUND)
    rules = CHANNELS.get(channel)
    if rules is None:
        return Final(FAILED, f"{CHANNEL_UNSUPPORTED}: {channel or 'unspecified'}")
    address_problem = rules.address_problem(rules.address(profile))
    if address_problem:
        return Final(SUPPRESSED, address_problem)
    if purpose != TRANSACTIONAL:
        status = profile.consents.get((purpose, channel), "")
        if status in WITHDRAWN_STATUSES:
            return Final(SUPPRESSED, CONSENT_WITHDRAWN)
        if status != GRANTED:
            return Final(SUPPRESSED, CONSENT_MISSING)
    return None


def template_variables(variables: Mapping[str, Any]) -> dict[str, Any]:
    """Variables as a preview gets them: first_name sanitized (dropped when unusable)."""
    out = dict(variables)
    name = clean_first_name(out.pop("first_name", None))
    if name is not None:
        out["first_name"] = name
    return out


def message_variables(variables: Mapping[str, Any], profile: ProfileView) -> dict[str, Any]:
    """Request variables plus the person's sanitized first name and email address."""
    out = {k: v for k, v in variables.items() if k not in RESERVED_VARIABLES}
    name = clean_first_name(profile.first_name)
    if name is not None:
        out["first_name"] = name
    out["email"] = profile.email.strip()
    return out


def decide(
    request: DeliveryRequest,
    profile: ProfileView | None,
    template: Template | None,
    renderer: Renderer,
) -> Decision:
    """SEND with the rendered message, or the final status and why not."""
    problem = request_problem(request)
    if problem:
        return Final(FAILED, problem)
    refused = recipient_check(request.purpose, request.channel, profile)
    if refused is not None or profile is None:
        return refused or Final(SUPPRESSED, PROFILE_NOT_FOUND)
    if template is None:
        return Final(FAILED, TEMPLATE_NOT_FOUND)
    if template.channel != request.channel:
        return Final(FAILED, f"{TEMPLATE_CHANNEL_MISMATCH}: template is for {template.channel}")
    channel = CHANNELS[request.channel]
    try:
        rendered = renderer.render(
            template.subject,
            template.body_text,
            message_variables(request.variables, profile),
            channel.limits,
        )
        banner = _banner(request, profile, template, rendered, renderer) if channel.name == WEB else None
    except RenderError as exc:
        return Final(SUPPRESSED, exc.reason)
    return Send(
        recipient=channel.address(profile),
        subject=rendered.subject,
        body_text=rendered.body_text,
        request=request,
        template=template,
        tenant_id=request.tenant_id,
        banner=banner,
    )


def _banner(
    request: DeliveryRequest, profile: ProfileView, template: Template, rendered: Rendered, renderer: Renderer
) -> BannerContent:
    """A web message's banner: the template's placement, lifetime and rendered link, the
    trigger's priority and the moment's end, and the person's anonymous ids (which ask for it too)."""
    if len(rendered.body_text) > MAX_BODY_CHARS:
        raise RenderError(f"body_text: longer than {MAX_BODY_CHARS} characters")
    link = ""
    if template.link_url:
        variables = message_variables(request.variables, profile)
        link = renderer.render_line("link_url", template.link_url, variables, MAX_LINK_CHARS)
    if template.banner_lifetime is None:
        raise RenderError("banner_lifetime: the template has none")
    return BannerContent(
        tenant_id=request.tenant_id,
        trigger_id=request.trigger_id,
        placement=template.placement,
        link_url=link,
        priority=request.priority,
        purpose=request.purpose,
        lifetime=template.banner_lifetime,
        expire_time=request.expire_at,
        anonymous_ids=profile.anonymous_ids,
        requested_at=request.requested_at,
    )
