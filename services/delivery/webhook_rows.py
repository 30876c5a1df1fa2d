"""Webhook endpoints in the delivery database: where a tenant's webhook messages are posted,
and the secret they are signed with (kept as given out: the HMAC needs it)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncEngine

from relevans.kit.errors import NotFound
from services.delivery.domain.webhooks import WebhookEndpoint
from services.delivery.tables import TZ, metadata

EndpointKey = tuple[str, str]  # (tenant_id, endpoint_id)

webhook_endpoints = sa.Table(
    "webhook_endpoints",
    metadata,
    sa.Column("tenant_id", sa.Text, primary_key=True),
    sa.Column("endpoint_id", sa.Text, primary_key=True),
    sa.Column("url", sa.Text, nullable=False),
    sa.Column("secret", sa.Text, nullable=False),
    sa.Column("timeout_ms", sa.Integer, nullable=False),
    sa.Column("created_at", TZ, nullable=False),
    sa.Column("updated_at", TZ, nullable=False),
)


def _endpoint(row: sa.Row[Any]) -> WebhookEndpoint:
    return WebhookEndpoint(
        endpoint_id=row.endpoint_id,
        url=row.url,
        secret=row.secret,
        timeout=timedelta(milliseconds=row.timeout_ms),
        updated_at=row.updated_at,
    )


class WebhookRows:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def put(
        self, tenant: str, endpoint: WebhookEndpoint, now: datetime, *, rotate_secret: bool
    ) -> tuple[WebhookEndpoint, bool]:
        """Create or replace an endpoint; its secret is `endpoint.secret` when it is new or
        `rotate_secret` is set, else the one it had. Returns the endpoint and whether its
        secret is the new one."""
        t = webhook_endpoints
        insert = pg_insert(t).values(
            tenant_id=tenant,
            endpoint_id=endpoint.endpoint_id,
            url=endpoint.url,
            secret=endpoint.secret,
            timeout_ms=int(endpoint.timeout.total_seconds() * 1000),
            created_at=now,
            updated_at=now,
        )
        stmt = insert.on_conflict_do_update(
            index_elements=[t.c.tenant_id, t.c.endpoint_id],
            set_={
                "url": insert.excluded.url,
                "timeout_ms": insert.excluded.timeout_ms,
                "updated_at": insert.excluded.updated_at,
                "secret": insert.excluded.secret if rotate_secret else t.c.secret,
            },
        ).returning(*t.c, (sa.literal_column("xmax") == 0).label("created"))
        async with self.engine.begin() as conn:
            row = (await conn.execute(stmt)).one()
        return _endpoint(row), bool(row.created) or rotate_secret

    async def get(self, tenant: str, endpoint_id: str) -> WebhookEndpoint:
        found = await self.load([(tenant, endpoint_id)])
        if (tenant, endpoint_id) not in found:
            raise NotFound(f"no webhook endpoint {endpoint_id!r}")
        return found[(tenant, endpoint_id)]

    async def load(self, keys: Iterable[EndpointKey]) -> dict[EndpointKey, WebhookEndpoint]:
        wanted = sorted(set(keys))
        if not wanted:
            return {}
        t = webhook_endpoints
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                sa.select(t).where(sa.tuple_(t.c.tenant_id, t.c.endpoint_id).in_(wanted))
            )
            return {(r.tenant_id, r.endpoint_id): _endpoint(r) for r in rows}
