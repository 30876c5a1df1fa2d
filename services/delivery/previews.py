"""PreviewTemplate's and SendTest's shared step: load the variants, the tenant's default locale and
(for a person) their profile, then render (`domain/previews.py`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from relevans.kit.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from services.delivery.domain import Renderer, RenderError, Template
from services.delivery.domain.decision import MAX_ID_CHARS, ProfileView
from services.delivery.domain.locales import locale_problem
from services.delivery.domain.previews import Preview, render_preview
from services.delivery.profiles import ProfileClient, ProfileLookupError
from services.delivery.template_rows import TemplateRows


class Previews:
    def __init__(self, templates: TemplateRows, profiles: ProfileClient, renderer: Renderer) -> None:
        self.templates = templates
        self.profiles = profiles
        self.renderer = renderer

    def check(self, profile_id: str, locale: str) -> None:
        """InvalidArgument naming `profile_id` or `locale` when they cannot be looked up."""
        if len(profile_id) > MAX_ID_CHARS:
            raise InvalidArgument(FieldViolation("profile_id", f"must be at most {MAX_ID_CHARS} characters"))
        if locale and not profile_id:
            problem = locale_problem(locale)
            if problem:
                raise InvalidArgument(FieldViolation("locale", problem))

    async def variants(self, tenant: str, template_id: str) -> list[Template]:
        return await self.templates.variants(tenant, template_id)

    async def person(self, tenant: str, profile_id: str) -> ProfileView | None:
        """The person to render for (None without a profile id); NotFound when unknown or erased."""
        if not profile_id:
            return None
        try:
            view = await self.profiles.get_one(tenant, profile_id)
        except ProfileLookupError as exc:
            raise FailedPrecondition(f"the profile cannot be looked up now: {exc}") from None
        if view is None:
            raise NotFound(f"no profile {profile_id!r}")
        return view

    async def render(
        self,
        tenant: str,
        variants: list[Template],
        variables: Mapping[str, Any],
        *,
        profile: ProfileView | None,
        locale: str,
    ) -> Preview:
        """The rendered variant; FailedPrecondition with the render_failed reason when it cannot
        be rendered safely."""
        settings = await self.templates.settings(tenant)
        try:
            return render_preview(
                variants, settings.default_locale, variables, self.renderer, profile=profile, locale=locale
            )
        except RenderError as exc:
            raise FailedPrecondition(exc.reason) from None
