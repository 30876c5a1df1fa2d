"""The environment a test gives a `relevans up` it starts as a user would: free ports of its own and
no `RELEVANS_*` setting inherited from the machine."""

from __future__ import annotations

import os

from relevans.local.embedded import free_port


def up_env(profile_port: int | None = None) -> dict[str, str]:
    """This process's environment without `RELEVANS_*`, plus free ports for every server of the stack
    (`profile_port` for profile's gRPC when the test chose it) and quiet logs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELEVANS_")}
    env.update(
        {
            "RELEVANS_POSTGRES_URL": f"postgresql://postgres@127.0.0.1:{free_port()}",
            "RELEVANS_NATS_URL": f"nats://127.0.0.1:{free_port()}",
            "RELEVANS_SMTP_PORT": str(free_port()),
            "RELEVANS_SMS_PROVIDER_URL": f"http://127.0.0.1:{free_port()}",
            "RELEVANS_PROFILE_LISTEN": f"127.0.0.1:{profile_port or free_port()}",
            "RELEVANS_TRIGGER_LISTEN": f"127.0.0.1:{free_port()}",
            "RELEVANS_DELIVERY_LISTEN": f"127.0.0.1:{free_port()}",
            "RELEVANS_DELIVERY_HTTP_LISTEN": f"127.0.0.1:{free_port()}",
            "RELEVANS_PROFILE_METRICS_PORT": "0",
            "RELEVANS_TRIGGER_METRICS_PORT": "0",
            "RELEVANS_DELIVERY_METRICS_PORT": "0",
            "RELEVANS_LOG_LEVEL": "warning",
        }
    )
    return env
