"""Queries of templates (one row per locale variant) and of the tenants' delivery settings.

A template id holds one variant per locale, all of one channel: saving a variant takes a
transaction-level advisory lock on (tenant, template id), so two variants of different channels
saved at once cannot both go in. The worker loads every variant of the templates its batch needs,
with each tenant's default locale, and picks each person's variant (`pick_variant`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from relevans.kit.errors import FieldViolation, InvalidArgument, NotFound
from relevans.kit.locks import lock_key64
from relevans.kit.merges import Person
from services.delivery.domain import DeliveryRequest, ProfileView, Template
from services.delivery.domain.settings import TenantSettings
from services.delivery.domain.templates import pick_variant
from services.delivery.tables import delivery_settings, templates

TemplateKey = tuple[str, str]  # (tenant_id, template_id)
# What saving a variant again replaces.
_REPLACED = (
    "channel",
    "subject",
    "body_text",
    "webhook_endpoint_id",
    "placement",
    "banner_lifetime",
    "link_url",
    "updated_at",
)
RequestKey = tuple[str, str]  # (tenant_id, idempotency_key)

_RECORD_LOCALES = sa.text("""
UPDATE messages AS m SET locale = u.locale
FROM unnest(CAST(:tenants AS text[]), CAST(:ids AS text[]), CAST(:locales AS text[]))
    AS u(tenant_id, message_id, locale)
WHERE m.tenant_id = u.tenant_id AND m.message_id = u.message_id AND m.locale <> u.locale
""")


def _template(row: sa.Row[Any]) -> Template:
    return Template(
        template_id=row.template_id,
        channel=row.channel,
        locale=row.locale,
        subject=row.subject,
        body_text=row.body_text,
        updated_at=row.updated_at,
        webhook_endpoint_id=row.webhook_endpoint_id,
        placement=row.placement,
        banner_lifetime=row.banner_lifetime,
        link_url=row.link_url,
    )


def _settings(row: sa.Row[Any] | None) -> TenantSettings:
    if row is None:
        return TenantSettings()
    return TenantSettings(default_locale=row.default_locale, updated_at=row.updated_at)


class TemplateRows:
    """The API's reads and writes of templates and settings."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def put(self, tenant: str, t: Template, now: datetime) -> Template:
        """Create or replace the variant of `t.locale`; InvalidArgument (`template.channel`) when the
        template id's other variants are of another channel."""
        values = {
            "tenant_id": tenant,
            "template_id": t.template_id,
            "locale": t.locale,
            "channel": t.channel,
            "subject": t.subject,
            "body_text": t.body_text,
            "webhook_endpoint_id": t.webhook_endpoint_id,
            "placement": t.placement,
            "banner_lifetime": t.banner_lifetime,
            "link_url": t.link_url,
            "created_at": now,
            "updated_at": now,
        }
        insert = pg_insert(templates).values(values)
        stmt = insert.on_conflict_do_update(
            index_elements=[templates.c.tenant_id, templates.c.template_id, templates.c.locale],
            set_={k: insert.excluded[k] for k in _REPLACED},
        ).returning(*templates.c)
        async with self.engine.begin() as conn:
            await conn.execute(
                sa.select(sa.func.pg_advisory_xact_lock(lock_key64("template", tenant, t.template_id)))
            )
            other = (
                await conn.execute(
                    sa.select(templates.c.channel, templates.c.locale)
                    .where(
                        templates.c.tenant_id == tenant,
                        templates.c.template_id == t.template_id,
                        templates.c.locale != t.locale,
                        templates.c.channel != t.channel,
                    )
                    .limit(1)
                )
            ).one_or_none()
            if other is not None:
                raise InvalidArgument(
                    FieldViolation(
                        "template.channel",
                        f"the template's other variants ({other.locale}, ...) are {other.channel} "
                        "templates: all variants of a template id are of one channel",
                    )
                )
            row = (await conn.execute(stmt)).one()
        return _template(row)

    async def variants(self, tenant: str, template_id: str) -> list[Template]:
        """Every variant of the template, in locale order; NotFound when it has none."""
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(
                    sa.select(templates)
                    .where(templates.c.tenant_id == tenant, templates.c.template_id == template_id)
                    .order_by(templates.c.locale)
                )
            ).all()
        if not rows:
            raise NotFound(f"no template {template_id!r}")
        return [_template(r) for r in rows]

    async def settings(self, tenant: str) -> TenantSettings:
        async with self.engine.connect() as conn:
            query = sa.select(delivery_settings).where(delivery_settings.c.tenant_id == tenant)
            row = (await conn.execute(query)).one_or_none()
        return _settings(row)

    async def update_settings(self, tenant: str, settings: TenantSettings, now: datetime) -> TenantSettings:
        insert = pg_insert(delivery_settings).values(
            tenant_id=tenant, default_locale=settings.default_locale, updated_at=now
        )
        stmt = insert.on_conflict_do_update(
            index_elements=[delivery_settings.c.tenant_id],
            set_={"default_locale": insert.excluded.default_locale, "updated_at": insert.excluded.updated_at},
        ).returning(*delivery_settings.c)
        async with self.engine.begin() as conn:
            row = (await conn.execute(stmt)).one()
        return _settings(row)


# ---- the worker's reads and writes, in its transactions --------------------------------------------


async def load_variants(
    conn: AsyncConnection, keys: Iterable[TemplateKey]
) -> tuple[dict[TemplateKey, list[Template]], dict[str, str]]:
    """Every variant of each template, in locale order, and the default locale of each tenant that
    has a variant ("" when it set none), in one statement."""
    wanted = sorted(set(keys))
    if not wanted:
        return {}, {}
    rows = await conn.execute(
        sa.select(templates, delivery_settings.c.default_locale)
        .select_from(
            templates.outerjoin(delivery_settings, delivery_settings.c.tenant_id == templates.c.tenant_id)
        )
        .where(sa.tuple_(templates.c.tenant_id, templates.c.template_id).in_(wanted))
        .order_by(templates.c.tenant_id, templates.c.template_id, templates.c.locale)
    )
    variants: dict[TemplateKey, list[Template]] = {}
    defaults: dict[str, str] = {}
    for r in rows:
        variants.setdefault((r.tenant_id, r.template_id), []).append(_template(r))
        defaults[r.tenant_id] = r.default_locale or ""
    return variants, defaults


async def pick_templates(
    conn: AsyncConnection, requests: Sequence[DeliveryRequest], views: Mapping[Person, ProfileView]
) -> dict[RequestKey, Template]:
    """The template variant each request's person gets (by their locale and the tenant's default);
    absent when the template has no variant. A person not found gets the tenant default's variant."""
    variants, defaults = await load_variants(conn, {(r.tenant_id, r.template_id) for r in requests})
    picked: dict[RequestKey, Template] = {}
    for r in requests:
        view = views.get((r.tenant_id, r.profile_id))
        chosen = pick_variant(
            variants.get((r.tenant_id, r.template_id), ()),
            view.locale if view is not None else "",
            defaults.get(r.tenant_id, ""),
        )
        if chosen is not None:
            picked[r.key] = chosen
    return picked


async def record_locales(conn: AsyncConnection, locales: Mapping[tuple[str, str], str]) -> None:
    """Record the variant used on each (tenant, message id), in the caller's transaction."""
    if not locales:
        return
    keys = sorted(locales)
    await conn.execute(
        _RECORD_LOCALES,
        {
            "tenants": [t for t, _ in keys],
            "ids": [m for _, m in keys],
            "locales": [locales[k] for k in keys],
        },
    )
