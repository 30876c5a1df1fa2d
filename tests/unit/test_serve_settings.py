"""Settings and CLI checks of the scaling knobs: processes per service, relay, event loop."""

from __future__ import annotations

import pytest

from relevans.cli.main import _serve
from relevans.kit.settings import Settings, SettingsError


def test_scaling_settings_parse_from_the_environment() -> None:
    s = Settings.from_env(
        {
            "RELEVANS_PROFILE_PROCESSES": "3",
            "RELEVANS_OUTBOX_RELAY": "off",
            "RELEVANS_EVENT_LOOP": "asyncio",
            "RELEVANS_GRPC_SERVERS": "2",
        }
    )
    assert (s.processes("profile"), s.outbox_relay, s.event_loop, s.grpc_servers) == (3, False, "asyncio", 2)
    assert s.processes("trigger") == 1 and Settings().outbox_relay is True and Settings().grpc_servers == 4


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"RELEVANS_OUTBOX_RELAY": "maybe"}, "RELEVANS_OUTBOX_RELAY"),
        ({"RELEVANS_PROFILE_PROCESSES": "0"}, "RELEVANS_PROFILE_PROCESSES"),
        ({"RELEVANS_EVENT_LOOP": "trio"}, "RELEVANS_EVENT_LOOP"),
        ({"RELEVANS_GRPC_SERVERS": "0"}, "RELEVANS_GRPC_SERVERS"),
    ],
)
def test_bad_scaling_settings_name_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        Settings.from_env(env)


async def test_several_processes_need_a_fixed_port(capsys: pytest.CaptureFixture[str]) -> None:
    settings = Settings(profile_processes=2, profile_listen="127.0.0.1:0")
    assert await _serve(settings, "profile", run_migrations=False) == 2
    assert "needs a fixed port" in capsys.readouterr().err
