"""The delivery service's tables (SQLAlchemy Core); the migrations create them.

Messages are keyed twice: by `message_id` for the API and by (tenant_id,
idempotency_key), unique, for the at-most-once guarantee. Every status change is
appended to `message_status_history`.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

from relevans.kit.outbox import outbox_table
from relevans.kit.people import erased_profiles_table, merged_profiles_table
from services.delivery.domain import STATUSES

TZ = sa.DateTime(timezone=True)
_STATUS_CHECK = "status IN (" + ", ".join(f"'{s}'" for s in STATUSES) + ")"

metadata = sa.MetaData()

templates = sa.Table(
    "templates",
    metadata,
    sa.Column("tenant_id", sa.Text, primary_key=True),
    sa.Column("template_id", sa.Text, primary_key=True),
    sa.Column("channel", sa.Text, nullable=False),
    sa.Column("locale", sa.Text, nullable=False),
    sa.Column("subject", sa.Text, nullable=False),
    sa.Column("body_text", sa.Text, nullable=False),
    sa.Column("created_at", TZ, nullable=False),
    sa.Column("updated_at", TZ, nullable=False),
    # Web (banner) templates.
    sa.Column("placement", sa.Text, nullable=False, server_default=""),
    sa.Column("banner_lifetime", sa.Interval, nullable=True),
    sa.Column("link_url", sa.Text, nullable=False, server_default=""),
)

messages = sa.Table(
    "messages",
    metadata,
    sa.Column("tenant_id", sa.Text, primary_key=True),
    sa.Column("message_id", sa.Text, primary_key=True),
    # Creation order: ListMessages pages newest first by it.
    sa.Column("seq", sa.BigInteger, sa.Identity(), nullable=False),
    sa.Column("idempotency_key", sa.Text, nullable=False),
    sa.Column("profile_id", sa.Text, nullable=False),
    sa.Column("trigger_id", sa.Text, nullable=False),
    sa.Column("channel", sa.Text, nullable=False),
    sa.Column("purpose", sa.Text, nullable=False),
    sa.Column("template_id", sa.Text, nullable=False),
    sa.Column("variables", JSONB, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("recipient", sa.Text, nullable=False),
    sa.Column("subject", sa.Text, nullable=False),
    # Deliveries of the request that ended in a failure worth retrying.
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("created_at", TZ, nullable=False),
    sa.Column("updated_at", TZ, nullable=False),
    sa.UniqueConstraint("tenant_id", "idempotency_key", name="messages_idempotency"),
    sa.CheckConstraint(_STATUS_CHECK, name="messages_status"),
    sa.Index("messages_tenant_seq", "tenant_id", "seq"),
    sa.Index("messages_profile_seq", "tenant_id", "profile_id", "seq"),
)

history = sa.Table(
    "message_status_history",
    metadata,
    sa.Column("tenant_id", sa.Text, primary_key=True),
    sa.Column("message_id", sa.Text, primary_key=True),
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("at", TZ, nullable=False),
)

# GDPR: the sha256 hex of each identifier of an erased person; a message to one is suppressed.
suppressions = sa.Table(
    "suppressions",
    metadata,
    sa.Column("tenant_id", sa.Text, primary_key=True),
    sa.Column("value_hash", sa.Text, primary_key=True),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("created_at", TZ, nullable=False),
)

# GDPR: erased people (a random profile id, nothing personal); a request for one that arrives
# after the erasure is dropped without a trace.
erased_profiles = erased_profiles_table(metadata)

merged_profiles = merged_profiles_table(metadata)

# On-site banners placed by web messages; every delivery process keeps the live ones in memory
# (banner_inbox.py). Withdrawn ones keep their row (withdrawn_at, withdraw_reason).
banners = sa.Table(
    "banners",
    metadata,
    sa.Column("tenant_id", sa.Text, primary_key=True),
    sa.Column("message_id", sa.Text, primary_key=True),
    sa.Column("profile_id", sa.Text, nullable=False),
    sa.Column("anonymous_ids", ARRAY(sa.Text), nullable=False),
    sa.Column("trigger_id", sa.Text, nullable=False),
    sa.Column("purpose", sa.Text, nullable=False),
    sa.Column("placement", sa.Text, nullable=False),
    sa.Column("title", sa.Text, nullable=False),
    sa.Column("body_text", sa.Text, nullable=False),
    sa.Column("link_url", sa.Text, nullable=False),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("placed_at", TZ, nullable=False),
    sa.Column("expire_at", TZ, nullable=False),
    sa.Column("withdrawn_at", TZ, nullable=True),
    sa.Column("withdraw_reason", sa.Text, nullable=False, server_default=""),
    sa.Column("shown_count", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("first_shown_at", TZ, nullable=True),
    # When the trigger asked for the message: a withdrawal of the moment from then on applies.
    sa.Column("requested_at", TZ, nullable=False),
    sa.Index("banners_person", "tenant_id", "profile_id", "trigger_id"),
    sa.Index("banners_live", "expire_at", postgresql_where=sa.text("withdrawn_at IS NULL")),
)

# The last withdrawal of each person's trigger: a banner whose request came before it (placed late,
# after a retry) is placed withdrawn.
banner_withdrawals = sa.Table(
    "banner_withdrawals",
    metadata,
    sa.Column("tenant_id", sa.Text, primary_key=True),
    sa.Column("profile_id", sa.Text, primary_key=True),
    sa.Column("trigger_id", sa.Text, primary_key=True),
    sa.Column("withdrawn_at", TZ, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
)

# Each person's latest web consent decision per purpose, as followed from profile: a banner placed
# while its withdrawal was being handled is placed withdrawn.
banner_consents = sa.Table(
    "banner_consents",
    metadata,
    sa.Column("tenant_id", sa.Text, primary_key=True),
    sa.Column("profile_id", sa.Text, primary_key=True),
    sa.Column("purpose", sa.Text, primary_key=True),
    sa.Column("refused", sa.Boolean, nullable=False),
    sa.Column("changed_at", TZ, nullable=False),
)

outbox = outbox_table(metadata)
