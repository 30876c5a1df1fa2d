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

# One row per variant: a template id holds a variant per locale, all of one channel.
templates = sa.Table(
    "templates",
    metadata,
    sa.Column("tenant_id", sa.Text, primary_key=True),
    sa.Column("template_id", sa.Text, primary_key=True),
    sa.Column("locale", sa.Text, primary_key=True),
    sa.Column("channel", sa.Text, nullable=False),
    sa.Column("subject", sa.Text, nullable=False),
    sa.Column("body_text", sa.Text, nullable=False),
    sa.Column("created_at", TZ, nullable=False),
    sa.Column("updated_at", TZ, nullable=False),
    # Webhook templates: the endpoint their messages are posted to ("" for other channels).
    sa.Column("webhook_endpoint_id", sa.Text, nullable=False, server_default=""),
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
    # Attempts at sending the message so far.
    sa.Column("attempts", sa.Integer, nullable=False),
    # SMS: the segments the body was sent in, recorded with the claim (0 for other channels).
    sa.Column("sms_segments", sa.Integer, nullable=False, server_default="0"),
    # When a pending message's next attempt is due (after a transient failure), else NULL.
    sa.Column("next_attempt_at", TZ, nullable=True),
    # The template variant used ("" until one was picked).
    sa.Column("locale", sa.Text, nullable=False, server_default=""),
    # Sent by SendTest: not part of any trigger, not counted anywhere.
    sa.Column("test", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("created_at", TZ, nullable=False),
    sa.Column("updated_at", TZ, nullable=False),
    sa.UniqueConstraint("tenant_id", "idempotency_key", name="messages_idempotency"),
    sa.CheckConstraint(_STATUS_CHECK, name="messages_status"),
    sa.Index("messages_tenant_seq", "tenant_id", "seq"),
    sa.Index("messages_profile_seq", "tenant_id", "profile_id", "seq"),
    sa.Index(
        "messages_next_attempt", "next_attempt_at", postgresql_where=sa.text("next_attempt_at IS NOT NULL")
    ),
    # Room on each page, so a claim and an outcome update the row in place (migration 0011).
    postgresql_with={"fillfactor": 75},
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

# One tenant's delivery settings; a tenant without a row has the defaults.
delivery_settings = sa.Table(
    "delivery_settings",
    metadata,
    sa.Column("tenant_id", sa.Text, primary_key=True),
    # The last locale of every template's fallback chain before en; "" means en.
    sa.Column("default_locale", sa.Text, nullable=False),
    sa.Column("updated_at", TZ, nullable=False),
)

# Addresses never sent to again, by the sha256 hex of the identifier (`identifier_hash`): an erased
# person's identifiers on every channel (channel ""), an address that bounced on its channel.
suppressions = sa.Table(
    "suppressions",
    metadata,
    sa.Column("tenant_id", sa.Text, primary_key=True),
    sa.Column("value_hash", sa.Text, primary_key=True),
    sa.Column("channel", sa.Text, primary_key=True, server_default=sa.text("''")),
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

# Engagement through a message's signed links (services/delivery/engagements.py): one row per
# message, kind and link (the URL for a click, "" otherwise), counting repeats. Goes with its message.
engagements = sa.Table(
    "engagements",
    metadata,
    sa.Column("tenant_id", sa.Text, primary_key=True),
    sa.Column("message_id", sa.Text, primary_key=True),
    sa.Column("kind", sa.Text, primary_key=True),
    sa.Column("link", sa.Text, primary_key=True),
    sa.Column("count", sa.Integer, nullable=False),
    sa.Column("first_at", TZ, nullable=False),
    sa.Column("last_at", TZ, nullable=False),
    sa.ForeignKeyConstraint(
        ["tenant_id", "message_id"], ["messages.tenant_id", "messages.message_id"], ondelete="CASCADE"
    ),
)

# Engagements not yet reported to profile (the consent an unsubscribe withdraws, the event each
# becomes): written with the engagement, deleted once profile took it, retried until then.
profile_reports = sa.Table(
    "profile_reports",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("tenant_id", sa.Text, nullable=False),
    sa.Column("message_id", sa.Text, nullable=False),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("url", sa.Text, nullable=False),
    sa.Column("at", TZ, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("next_at", TZ, nullable=False),
    sa.Column("last_error", sa.Text, nullable=False),
    sa.ForeignKeyConstraint(
        ["tenant_id", "message_id"], ["messages.tenant_id", "messages.message_id"], ondelete="CASCADE"
    ),
    sa.Index("profile_reports_due", "next_at"),
    sa.Index("profile_reports_message", "tenant_id", "message_id"),
)
