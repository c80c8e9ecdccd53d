"""What this machine is, reported to the hub when the daemon registers.

The hub's scheduler matches task requirements against these keys (see
``hub_server/hardware.py``): ``os``, ``distro``, ``arch``, ``cpu``,
``cores``, ``ram`` and ``gpus``.  The other keys are informational.
"""

from __future__ import annotations

import platform
import shlex
import socket
import subprocess
from pathlib import Path
from typing import Any, Optional

import psutil

from hwf_daemon.gpu import list_gpus

_CPUINFO_KEYS = ("model name", "hardware", "cpu model", "model", "processor")


def _read_text(path: str) -> Optional[str]:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _os_release_pretty_name(text: str) -> Optional[str]:
    """``PRETTY_NAME`` from the text of ``/etc/os-release``."""
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == "PRETTY_NAME":
            try:
                parts = shlex.split(value)
            except ValueError:
                parts = [value.strip().strip("\"'")]
            name = " ".join(parts).strip()
            if name:
                return name
    return None


def _distro(os_family: str) -> str:
    if os_family == "linux":
        for path in ("/etc/os-release", "/usr/lib/os-release"):
            text = _read_text(path)
            name = _os_release_pretty_name(text) if text else None
            if name:
                return name
    elif os_family == "darwin":
        release = platform.mac_ver()[0]
        if release:
            return f"macOS {release}"
    return platform.platform()


def _cpu_model_from_cpuinfo(text: str) -> Optional[str]:
    """The CPU model in ``/proc/cpuinfo``; ARM kernels name it differently."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip().lower()
        value = value.strip()
        if sep and value and key not in fields:
            fields[key] = value
    for key in _CPUINFO_KEYS:
        value = fields.get(key)
        # On x86 "processor" is just the CPU number: not a model.
        if value and not value.isdigit():
            return value
    return None


def _cpu_model(os_family: str) -> str:
    if os_family == "linux":
        text = _read_text("/proc/cpuinfo")
        model = _cpu_model_from_cpuinfo(text) if text else None
        if model:
            return model
    elif os_family == "darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"],
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
            if out:
                return out
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


def detect_hardware() -> dict[str, Any]:
    """Describe this machine with the keys the hub's scheduler matches on."""
    os_family = platform.system().lower()
    return {
        "os": os_family,
        "distro": _distro(os_family),
        "os_version": platform.release(),
        "arch": platform.machine().lower(),
        "cpu": _cpu_model(os_family),
        "cores": psutil.cpu_count(logical=True) or 1,
        "physical_cores": psutil.cpu_count(logical=False) or psutil.cpu_count() or 1,
        "ram": int(psutil.virtual_memory().total),
        "gpus": list_gpus(),
        "hostname": socket.gethostname(),
        "python": platform.python_version(),
    }

