"""The example systemd units start the programs with options those programs accept."""

from __future__ import annotations

import argparse
import configparser
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
UNITS = REPO / "examples" / "systemd"


def unit(name: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # keys are case-sensitive in systemd
    cp.read(UNITS / name)
    return cp


def exec_start(name: str) -> tuple[str, list[str]]:
    argv = shlex.split(unit(name)["Service"]["ExecStart"].replace("${CREDENTIALS_DIRECTORY}", "/run/credentials/x"))
    return Path(argv[0]).name, argv[1:]


def parser_for(program: str) -> argparse.ArgumentParser:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert program in scripts, f"{program} is not a console script of the project"
    ap = argparse.ArgumentParser(prog=program)
    if program == "hwf-hub":
        from hub_server.cli import add_hub_arguments
        add_hub_arguments(ap)
    else:
        from hwf_daemon.cli import add_arguments
        add_arguments(ap)
    return ap


def test_hub_unit_runs_hwf_hub_with_tls_and_a_private_state_dir():
    program, args = exec_start("hwf-hub.service")
    ns = parser_for(program).parse_args(args)
    svc = unit("hwf-hub.service")["Service"]
    assert ns.state_dir == "/var/lib/hwf" and svc["StateDirectory"] == "hwf" and svc["StateDirectoryMode"] == "0700"
    assert ns.tls_cert and ns.tls_key and ns.host == "0.0.0.0"
    assert svc["Restart"] == "on-failure" and svc["User"] == "hwf"


def test_daemon_unit_drains_on_stop_and_reads_its_token_from_a_credential():
    program, args = exec_start("hwf-daemon.service")
    ns = parser_for(program).parse_args(args)
    svc = unit("hwf-daemon.service")["Service"]
    assert ns.token_file == "/run/credentials/x/daemon.token" and "--token" not in args
    assert svc["LoadCredential"].startswith("daemon.token:")
    assert ns.hub.startswith("wss://") and ns.ca_file
    # Stop = SIGTERM to the daemon alone (it drains), and systemd waits longer than the drain.
    assert svc["KillMode"] == "mixed" and svc["KillSignal"] == "SIGTERM"
    assert float(svc["TimeoutStopSec"]) > ns.drain_timeout
    assert "User" not in svc  # root: tasks run as per-slot users


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_units_verify():
    for name in ("hwf-hub.service", "hwf-daemon.service"):
        r = subprocess.run(["systemd-analyze", "verify", str(UNITS / name)], capture_output=True, text=True)
        assert "Unknown key" not in r.stderr and "Invalid" not in r.stderr, r.stderr
