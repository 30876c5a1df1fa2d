"""The data folder's record of the local stack, which every `relevans` command reads.

`relevans up` keeps two files in its data folder (`--data-dir`, `RELEVANS_DATA_DIR`, `.relevans`):

    token-secret   a random token secret made the first time, reused by every later `up`
    up.json        while `up` runs: the addresses it chose and a dev token for tenant `dev`

`stack_settings` layers them under the environment: a `RELEVANS_*` variable wins over the data
folder, and a command's flags win over both; so `relevans import`, `migrate`, `token create`,
`demo` and `health` reach the running stack with no addresses copied by hand.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relevans.kit.settings import Settings, env_name

STATE_FILE = "up.json"
SECRET_FILE = "token-secret"
DEV_TENANT = "dev"
# up.json's keys and the settings each one fills when its RELEVANS_* variable is not set.
STATE_SETTINGS = {
    "postgres": ("postgres_url",),
    "nats": ("nats_url",),
    "profile": ("profile_listen", "profile_target"),
    "trigger": ("trigger_listen",),
    "delivery": ("delivery_listen",),
    "smtp_port": ("smtp_port",),
    "profile_metrics_port": ("profile_metrics_port",),
    "trigger_metrics_port": ("trigger_metrics_port",),
    "delivery_metrics_port": ("delivery_metrics_port",),
}


@dataclass(frozen=True)
class Stack:
    """The settings a command uses, its data folder and what a running `up` recorded there."""

    settings: Settings
    data_dir: Path
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def running(self) -> bool:
        return bool(self.state)

    @property
    def token(self) -> str:
        """The running stack's dev token (tenant `dev`, admin), or empty."""
        return str(self.state.get("token", ""))

    def local_address(self, service: str) -> str:
        """Where a client on this machine reaches `service`: its listen address, an any-address
        (0.0.0.0, as in a container) made loopback."""
        address = self.settings.listen(service)
        host, _, port = address.rpartition(":")
        return f"127.0.0.1:{port}" if host in ("0.0.0.0", "[::]", "") else address


def data_dir_of(flag: str | None, env: dict[str, str] | None = None) -> Path:
    env = dict(os.environ if env is None else env)
    return Path(flag or env.get(env_name("data_dir")) or Settings.data_dir)


def read_state(data_dir: Path) -> dict[str, Any]:
    """What a running `up` recorded; empty when none runs on this folder (or the file is unreadable)."""
    try:
        state: dict[str, Any] = json.loads((data_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return state


def write_state(data_dir: Path, state: dict[str, Any]) -> None:
    """up.json, readable by its owner only (it holds an admin token)."""
    path = data_dir / STATE_FILE
    path.touch(mode=0o600, exist_ok=True)
    path.write_text(json.dumps(state, indent=2))


def read_secret(data_dir: Path) -> str:
    try:
        return (data_dir / SECRET_FILE).read_text().strip()
    except OSError:
        return ""


def ensure_secret(data_dir: Path) -> str:
    """The data folder's token secret, made (random, owner-only file) the first time."""
    secret = read_secret(data_dir)
    if not secret:
        secret = secrets.token_urlsafe(32)
        data_dir.mkdir(parents=True, exist_ok=True)
        path = data_dir / SECRET_FILE
        path.touch(mode=0o600, exist_ok=True)
        path.write_text(secret + "\n")
    return secret


def stack_settings(data_dir_flag: str | None = None, env: dict[str, str] | None = None) -> Stack:
    """The settings of a command: `RELEVANS_*` first, then the data folder's record and secret,
    then the defaults. Raises SettingsError for a bad variable."""
    env = dict(os.environ if env is None else env)
    data_dir = data_dir_of(data_dir_flag, env)
    state = read_state(data_dir)
    from_folder: dict[str, Any] = {}
    for key, names in STATE_SETTINGS.items():
        for name in names:
            if key in state and env_name(name) not in env:
                from_folder[name] = state[key]
    secret = read_secret(data_dir)
    if secret and env_name("token_secret") not in env:
        from_folder["token_secret"] = secret
    settings = Settings.from_env(env, **from_folder)
    return Stack(settings=settings, data_dir=data_dir, state=state)
