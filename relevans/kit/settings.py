"""Settings from `RELEVANS_*` environment variables, with documented defaults.

One dataclass for all three services, so an operator learns one set of names.
Every field below is documented in the README's configuration table under its
variable's name (`env_names`); the compose file's names are checked against them
(tests/unit/test_deployment_files.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

SERVICES = ("profile", "trigger", "delivery")

DEFAULT_PORTS = {"profile": 50151, "trigger": 50152, "delivery": 50153}
# Delivery's HTTP endpoint: one-click unsubscribe, the open pixel, click redirects.
DEFAULT_DELIVERY_HTTP_PORT = 50154
DEFAULT_METRICS_PORTS = {"profile": 9151, "trigger": 9152, "delivery": 9153}
EVENT_LOOPS = ("uvloop", "asyncio")


class SettingsError(ValueError):
    """A RELEVANS_* variable holds a value that cannot be used."""


@dataclass(frozen=True)
class Settings:
    # PostgreSQL server (without database name); each service uses its own database on it.
    postgres_url: str = "postgresql://postgres@127.0.0.1:54329"
    # Overrides the database URL of one service (RELEVANS_PROFILE_DATABASE_URL, ...).
    profile_database_url: str = ""
    trigger_database_url: str = ""
    delivery_database_url: str = ""
    nats_url: str = "nats://127.0.0.1:42229"
    # Shared HMAC secret that signs and verifies bearer tokens.
    token_secret: str = "dev-secret-change-me"
    # gRPC listen addresses.
    profile_listen: str = f"127.0.0.1:{DEFAULT_PORTS['profile']}"
    trigger_listen: str = f"127.0.0.1:{DEFAULT_PORTS['trigger']}"
    delivery_listen: str = f"127.0.0.1:{DEFAULT_PORTS['delivery']}"
    # Where delivery's HTTP endpoint (unsubscribe and tracking links) listens.
    delivery_http_listen: str = f"127.0.0.1:{DEFAULT_DELIVERY_HTTP_PORT}"
    # The base URL the links in messages use, as the recipients reach the endpoint (https behind a
    # proxy in production); empty means http://<delivery_http_listen>.
    delivery_public_url: str = ""
    # Where delivery reaches profile for send-time consent.
    profile_target: str = f"127.0.0.1:{DEFAULT_PORTS['profile']}"
    # Prometheus /metrics address and ports; port 0 disables the endpoint.
    metrics_host: str = "127.0.0.1"
    profile_metrics_port: int = DEFAULT_METRICS_PORTS["profile"]
    trigger_metrics_port: int = DEFAULT_METRICS_PORTS["trigger"]
    delivery_metrics_port: int = DEFAULT_METRICS_PORTS["delivery"]
    # Number of rv.events.<partition> subjects; one profile's events share one partition.
    event_partitions: int = 8
    # Processes `relevans serve profile` runs, sharing its gRPC port (SO_REUSEPORT, Linux).
    profile_processes: int = 1
    # Processes `relevans serve delivery` runs, sharing its gRPC and HTTP ports; each holds every
    # banner and sends its share of the work queue, the rate limits split between them.
    delivery_processes: int = 1
    # gRPC servers each service process runs on its port (SO_REUSEPORT, Linux): a grpc.aio server
    # takes one new call of a method per event loop turn, several take the calls of different
    # connections side by side (README, "Scaling out").
    grpc_servers: int = 4
    # Whether this process runs its outbox relay (relays of one service take turns; one is enough).
    outbox_relay: bool = True
    # asyncio event loop of the services: uvloop or asyncio.
    event_loop: str = "uvloop"
    # Days the trigger service keeps its decision trace (ExplainDecisions) before pruning it.
    trigger_decision_retention_days: int = 90
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 2525
    smtp_sender: str = "relevans <no-reply@relevans.local>"
    # Webhook URLs may be plain http (else https only).
    webhook_allow_insecure: bool = False
    # Webhooks may go to loopback, private, link-local and CGNAT addresses (never to metadata ones).
    webhook_allow_private: bool = False
    # Comma-separated host:port pairs exempt from the address check and the https rule, e.g.
    # "127.0.0.1:8090,[::1]:8090" (`relevans up` adds its demo webhook receiver).
    webhook_allow_addresses: str = ""
    # The SMS provider (the Twilio Messages API shape; `relevans up` points it at its SMS sink):
    # its base URL, account SID and auth token (HTTP basic auth), and the sender (a number in
    # E.164 or an alphanumeric sender id).
    sms_provider_url: str = "http://127.0.0.1:2526"
    sms_account_sid: str = "relevans-dev"
    sms_auth_token: str = "dev-sms-token-change-me"
    sms_sender: str = "relevans"
    # Segments an SMS may take (1-10: providers join at most 10 parts); a longer body is not sent
    # (suppressed "sms_too_long").
    sms_max_segments: int = 4
    # Seconds to connect to the SMS provider, and to wait for its answer once the request is sent.
    sms_timeout: float = 10.0
    # Messages per second one delivery process hands to the SMTP server, the SMS provider and
    # webhook receivers (all endpoints together); 0 = unlimited.
    smtp_rate_limit: float = 0.0
    # SMTP connections of one delivery process, each carrying one mail at a time: after a crash at
    # most this many mails are of unknown outcome; more connections share each claim's commit.
    smtp_connections: int = 16
    sms_rate_limit: float = 0.0
    webhook_rate_limit: float = 0.0
    # Seconds before the first retry of a transiently failed send (doubling each retry, half of
    # each wait random), and the longest wait between two attempts.
    delivery_retry_delay: float = 30.0
    delivery_retry_max_delay: float = 3600.0
    # Seconds in-flight calls get to finish on shutdown.
    shutdown_grace: float = 5.0
    # Default deadline, in seconds, for calls one service makes to another.
    call_deadline: float = 2.0
    # Deadline, in seconds, of delivery's batch profile lookups (up to 1,000 people a call): a lookup
    # that times out is retried with the send's back-off, so under load a short one throws work away.
    delivery_profile_deadline: float = 10.0
    log_level: str = "info"
    # json, console, or auto (console on a terminal, json otherwise).
    log_format: str = "auto"
    # Where `relevans up` keeps PostgreSQL, NATS and the SMTP sink's mail.
    data_dir: str = ".relevans"
    extra: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("profile_processes", "delivery_processes"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{env_name(name)}={getattr(self, name)} must be at least 1")
        if self.delivery_processes > 1 and self.delivery_http_listen.rsplit(":", 1)[-1] == "0":
            raise SettingsError(
                f"RELEVANS_DELIVERY_PROCESSES={self.delivery_processes} needs a fixed "
                "RELEVANS_DELIVERY_HTTP_LISTEN port, not 0 (the processes share it)"
            )
        if self.grpc_servers < 1:
            raise SettingsError(f"RELEVANS_GRPC_SERVERS={self.grpc_servers} must be at least 1")
        if self.trigger_decision_retention_days < 1:
            raise SettingsError(
                f"RELEVANS_TRIGGER_DECISION_RETENTION_DAYS={self.trigger_decision_retention_days} "
                "must be at least 1"
            )
        if not 1 <= self.sms_max_segments <= 10:
            raise SettingsError(f"RELEVANS_SMS_MAX_SEGMENTS={self.sms_max_segments} must be from 1 to 10")
        provider = urlsplit(self.sms_provider_url)
        if provider.scheme not in ("http", "https") or not provider.hostname:
            raise SettingsError(
                f"RELEVANS_SMS_PROVIDER_URL={self.sms_provider_url!r} must be an http:// or https:// URL"
            )
        if self.sms_timeout <= 0:
            raise SettingsError(f"RELEVANS_SMS_TIMEOUT={self.sms_timeout} must be more than 0 seconds")
        if not 1 <= self.smtp_connections <= 100:
            raise SettingsError(f"RELEVANS_SMTP_CONNECTIONS={self.smtp_connections} must be 1-100")
        for name in ("smtp_rate_limit", "sms_rate_limit", "webhook_rate_limit"):
            if getattr(self, name) < 0:
                raise SettingsError(f"{env_name(name)}={getattr(self, name)} must be 0 (unlimited) or more")
        if not 0 < self.delivery_retry_delay <= self.delivery_retry_max_delay:
            raise SettingsError(
                "RELEVANS_DELIVERY_RETRY_DELAY must be more than 0 and at most "
                f"RELEVANS_DELIVERY_RETRY_MAX_DELAY (got {self.delivery_retry_delay} and "
                f"{self.delivery_retry_max_delay})"
            )
        if "\r" in self.smtp_sender or "\n" in self.smtp_sender:
            # it becomes the From header: a line break would start headers of its own
            raise SettingsError("RELEVANS_SMTP_SENDER must be one line (no CR or LF)")
        if self.event_loop not in EVENT_LOOPS:
            raise SettingsError(
                f"RELEVANS_EVENT_LOOP={self.event_loop!r} must be one of {', '.join(EVENT_LOOPS)}"
            )

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> Settings:
        env = dict(os.environ if env is None else env)
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name == "extra":
                continue
            key = env_name(f.name)
            if key in env:
                values[f.name] = _parse(key, env[key], type(getattr(cls, f.name, "")) or str)
        values.update(overrides)
        return cls(**values)

    def database_url(self, service: str) -> str:
        """The SQLAlchemy URL of one service's own database."""
        explicit = str(getattr(self, f"{service}_database_url"))
        url = explicit or f"{self.postgres_url.rstrip('/')}/relevans_{service}"
        if url.startswith("postgresql://"):
            url = "postgresql+asyncpg://" + url.removeprefix("postgresql://")
        return url

    def listen(self, service: str) -> str:
        return str(getattr(self, f"{service}_listen"))

    def metrics_port(self, service: str) -> int:
        return int(getattr(self, f"{service}_metrics_port"))

    def processes(self, service: str) -> int:
        """How many processes serve `service` on its port (profile and delivery can run several)."""
        return int(getattr(self, f"{service}_processes", 1))


def env_name(field_name: str) -> str:
    return "RELEVANS_" + field_name.upper()


def env_names() -> list[str]:
    return [env_name(f.name) for f in fields(Settings) if f.name != "extra"]


_BOOLS = {
    "1": True,
    "true": True,
    "yes": True,
    "on": True,
    "0": False,
    "false": False,
    "no": False,
    "off": False,
}


def _parse(key: str, raw: str, kind: type) -> Any:
    if kind is bool:
        if raw.strip().lower() not in _BOOLS:
            raise SettingsError(f"{key}={raw!r} is not a boolean (true/false, 1/0, yes/no, on/off)")
        return _BOOLS[raw.strip().lower()]
    try:
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
    except ValueError as exc:
        raise SettingsError(f"{key}={raw!r} is not a {kind.__name__}") from exc
    return raw
