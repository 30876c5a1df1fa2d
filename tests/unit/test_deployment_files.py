"""No Docker engine runs here, so the compose file is checked against the real entry points and settings."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

from relevans.cli.main import _parser
from relevans.kit.settings import SERVICES, Settings, env_names

ROOT = Path(__file__).resolve().parents[2]


def compose() -> dict:  # type: ignore[type-arg]
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_has_infrastructure_migrations_services_and_smtp() -> None:
    services = compose()["services"]
    assert {"postgres", "nats", "migrate", "smtp", *SERVICES} <= set(services)
    assert "-js" in services["nats"]["command"]


def test_compose_environment_names_are_real_settings() -> None:
    known = set(env_names())
    for name, service in compose()["services"].items():
        for key in service.get("environment") or {}:
            if key.startswith("RELEVANS_"):
                assert key in known, f"{name}: {key} is not a setting"


def test_compose_commands_parse_with_the_real_cli() -> None:
    parser = _parser()
    for name in ("migrate", *SERVICES):
        args = parser.parse_args(compose()["services"][name]["command"])
        if name in SERVICES:
            assert args.command == "serve" and args.service == name
        else:
            assert args.command == "migrate"


def test_compose_environment_yields_valid_settings_and_ports() -> None:
    env = {k: str(v) for k, v in compose()["x-relevans-env"].items()}
    env["RELEVANS_TOKEN_SECRET"] = "x"
    settings = Settings.from_env(env)
    for service in SERVICES:
        port = settings.listen(service).rsplit(":", 1)[1]
        published = compose()["services"][service]["ports"][0].split(":")[1]
        assert port == published
    assert settings.profile_target == "profile:50151"
    assert settings.database_url("trigger").endswith("@postgres:5432/relevans_trigger")


def test_dockerfile_entrypoint_is_the_installed_console_script() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["relevans"] == "relevans.cli.main:main"
    assert re.search(r'ENTRYPOINT \["relevans"\]', (ROOT / "Dockerfile").read_text())


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    first_commands = re.findall(r"^(make \w+)\b", readme, flags=re.M)[:2]
    assert first_commands == ["make run", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()
