"""Hardware requirements: parsing, validation and matching against machines.

Sans-I/O and shared: the client validates a Task's ``hardware`` with it at
``Task`` time, and the hub's scheduler matches with it.

A machine's hardware (what a daemon reports) is a dict with keys
``os`` (family: linux/windows/darwin), ``distro``, ``arch``, ``cpu`` (model),
``cores``, ``ram`` (bytes), ``gpus`` (list of {name, memory}), ``runtimes``
(what it can run: ``shell``, ``python3.11``, ``grid``, ``docker``...), and
the daemon's ``name`` / ``machine_id`` / ``tags`` are matched too.

``runtime`` requires every runtime it names (``"python3.11"``,
``"docker"``, or several as ``"python3.11,docker"``): ``python`` alone is
any Python, ``python3`` any Python 3.  A daemon that reports no runtimes
(older than runtimes) runs shell commands only.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

KEYS = ("os", "cpu", "gpu", "ram", "cores", "tags", "daemon", "runtime")

# A machine meets a RAM minimum when it shows at least this share of it:
# firmware and kernel reserve part of physical memory, so a "16GB" machine
# shows about 15.5 GiB.
RAM_TOLERANCE = 0.94

_UNITS = {
    "": 1,
    "b": 1,
    "k": 2**10,
    "kb": 2**10,
    "kib": 2**10,
    "m": 2**20,
    "mb": 2**20,
    "mib": 2**20,
    "g": 2**30,
    "gb": 2**30,
    "gib": 2**30,
    "t": 2**40,
    "tb": 2**40,
    "tib": 2**40,
}
_RUNTIME_RE = re.compile(r"^[a-z][a-z0-9_.+-]{0,63}$")
_SIZE_RE = re.compile(r"^\s*([0-9]{1,20}(?:\.[0-9]{1,20})?)\s*([a-zA-Z]*)\s*$")
MAX_SIZE = 2**60  # one exbibyte: no machine has more, and it fits SQLite's integers
MAX_CORES = 1_000_000

_OS_FAMILIES = {
    "linux": "linux",
    "windows": "windows",
    "win": "windows",
    "win32": "windows",
    "darwin": "darwin",
    "macos": "darwin",
    "mac": "darwin",
    "osx": "darwin",
}
_ARCH_ALIASES = {
    "x86_64": "x86_64",
    "amd64": "x86_64",
    "x64": "x86_64",
    "arm64": "aarch64",
    "aarch64": "aarch64",
    "i386": "x86",
    "i686": "x86",
    "x86": "x86",
    "armv7l": "armv7l",
    "riscv64": "riscv64",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
}


class HardwareError(ValueError):
    """An unknown hardware key or a value that cannot be parsed."""


def parse_size(value: Any, *, key: str = "ram") -> int:
    """``"16GB"``, ``"512 MB"``, ``"1.5GiB"`` or an int of bytes -> bytes.

    GB and GiB are both read as 2**30: that is how RAM is sold and shown.
    """
    if isinstance(value, bool):
        raise HardwareError(f"hardware {key!r}: expected a size like '16GB', got {value!r}")
    size: Any = None
    if isinstance(value, int):
        if value < 0:
            raise HardwareError(f"hardware {key!r}: size must not be negative, got {value}")
        size = value
    elif isinstance(value, float) and 0 <= value <= MAX_SIZE:  # also refuses nan and inf
        size = int(value)
    elif isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m and m.group(2).lower() in _UNITS:
            size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if size is not None:
        if size > MAX_SIZE:
            raise HardwareError(f"hardware {key!r}: {str(value)[:40]!r} is more than the largest size, 1 EiB")
        return size
    raise HardwareError(
        f"hardware {key!r}: cannot parse {value!r} as a size (use e.g. '16GB', '512MB' or bytes)"
    )


def _is_any(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in ("any", "*", ""))


def normalize(hardware: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate a requirement dict; return it in canonical form.

    Raises HardwareError naming the key for unknown keys and bad values.
    Values of ``"any"`` are dropped: they constrain nothing.
    """
    if hardware is None:
        return {}
    if not isinstance(hardware, Mapping):
        raise HardwareError(f"hardware must be a dict, got {type(hardware).__name__}")
    out: dict[str, Any] = {}
    for raw_key, value in hardware.items():
        key = str(raw_key).lower()
        if key not in KEYS:
            raise HardwareError(
                f"unknown hardware key {raw_key!r} (known keys: {', '.join(KEYS)})"
            )
        if _is_any(value):
            continue
        if key == "ram":
            out["ram"] = parse_size(value)
        elif key == "cores":
            try:
                cores = int(value)
            except (TypeError, ValueError, OverflowError):
                raise HardwareError(f"hardware 'cores': expected a whole number, got {str(value)[:40]!r}") from None
            if (isinstance(value, bool) or not 1 <= cores <= MAX_CORES
                    or (isinstance(value, float) and value != cores)):
                raise HardwareError(
                    f"hardware 'cores': expected a whole number from 1 to {MAX_CORES}, got {str(value)[:40]!r}")
            out["cores"] = cores
        elif key == "runtime":
            out["runtime"] = _normalize_runtime(value)
        elif key == "tags":
            tags = [t.strip() for t in value.split(",")] if isinstance(value, str) else value
            if not isinstance(tags, (list, tuple, set, frozenset)) or not all(
                isinstance(t, str) for t in tags
            ):
                raise HardwareError(f"hardware 'tags': expected a list of strings, got {value!r}")
            tags = sorted({t.lower() for t in tags if t})
            if tags:
                out["tags"] = tags
        else:
            if not isinstance(value, str):
                raise HardwareError(f"hardware {key!r}: expected a string, got {value!r}")
            out[key] = value.strip() if key == "daemon" else value.strip().lower()
    return out


def _normalize_runtime(value: Any) -> str:
    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, (list, tuple, set, frozenset)) or not all(isinstance(n, str) for n in names):
        raise HardwareError(f"hardware 'runtime': expected a name like 'python3.11' or 'docker', got {value!r}")
    clean = sorted({n.strip().lower() for n in names if n.strip()})
    for n in clean:
        if not _RUNTIME_RE.match(n):
            raise HardwareError(f"hardware 'runtime': {n[:40]!r} is not a runtime name (e.g. 'python3.11', 'docker')")
    if not clean:
        raise HardwareError("hardware 'runtime': empty")
    return ",".join(clean)


def machine_runtimes(m: Mapping[str, Any]) -> list[str]:
    """What a machine can run (``shell`` for a daemon that predates runtimes)."""
    have = m.get("runtimes")
    if not isinstance(have, list) or not have:
        return ["shell"]
    return [str(r).lower() for r in have]


def canonical_key(req: Mapping[str, Any]) -> tuple:
    """A hashable key: tasks with equal keys have equal requirements."""
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in req.items()))


def matches(req: Mapping[str, Any], machine: Mapping[str, Any]) -> bool:
    """Does a machine (hardware dict + name/tags) meet a normalized requirement?"""
    return not mismatches(req, machine)


def mismatches(req: Mapping[str, Any], machine: Mapping[str, Any]) -> list[str]:
    """The requirement keys the machine fails, for 'why is this waiting' messages."""
    failed = []
    for key, want in req.items():
        if not _CHECKS[key](want, machine):
            failed.append(key)
    return failed


def _match_os(want: str, m: Mapping[str, Any]) -> bool:
    family = str(m.get("os", "")).lower()
    if want in _OS_FAMILIES:
        return _OS_FAMILIES[want] == family
    distro = str(m.get("distro", "")).lower()
    return want in distro or want == family


def _match_cpu(want: str, m: Mapping[str, Any]) -> bool:
    arch = str(m.get("arch", "")).lower()
    if want in _ARCH_ALIASES:
        return _ARCH_ALIASES[want] == _ARCH_ALIASES.get(arch, arch)
    return want in str(m.get("cpu", "")).lower()


def _match_gpu(want: str, m: Mapping[str, Any]) -> bool:
    gpus = m.get("gpus") or []
    if not isinstance(gpus, list):
        gpus = []
    if want == "none":
        return not gpus
    names = [str(g.get("name", "")).lower() for g in gpus if isinstance(g, Mapping)]
    if want in ("yes", "true", "some", "gpu"):
        return bool(names)
    return any(want in n for n in names)


def _number(value: Any) -> float:
    """A machine fact as a number; anything else counts as 0 (never raises)."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


def _match_ram(want: int, m: Mapping[str, Any]) -> bool:
    return _number(m.get("ram")) >= want * RAM_TOLERANCE


def _match_cores(want: int, m: Mapping[str, Any]) -> bool:
    return _number(m.get("cores")) >= want


def _match_tags(want: list[str], m: Mapping[str, Any]) -> bool:
    have = {str(t).lower() for t in m.get("tags") or []}
    return set(want) <= have


def _match_daemon(want: str, m: Mapping[str, Any]) -> bool:
    return want in (m.get("name"), m.get("machine_id"))


def _runtime_met(want: str, have: list[str]) -> bool:
    if want in have:
        return True
    if want == "python":  # any Python
        return any(h.startswith("python") for h in have)
    if want == "python3":
        return any(h.startswith("python3.") for h in have)
    return False


def _match_runtime(want: str, m: Mapping[str, Any]) -> bool:
    have = machine_runtimes(m)
    return all(_runtime_met(w, have) for w in want.split(","))


def _match_owners(want: list[str], m: Mapping[str, Any]) -> bool:
    """Set by the hub, never by a user: the machine's owner is one of ``want``."""
    return m.get("owner") in want


_CHECKS = {
    "os": _match_os,
    "cpu": _match_cpu,
    "gpu": _match_gpu,
    "ram": _match_ram,
    "cores": _match_cores,
    "tags": _match_tags,
    "daemon": _match_daemon,
    "owners": _match_owners,
    "runtime": _match_runtime,
}


def describe(req: Mapping[str, Any]) -> str:
    """Human text of a requirement, e.g. ``gpu=a100, ram>=16.0GiB``."""
    if not req:
        return "any machine"
    parts = []
    for k, v in req.items():
        if k == "ram":
            parts.append(f"ram>={v / 2**30:.1f}GiB")
        elif k == "cores":
            parts.append(f"cores>={v}")
        elif k == "tags":
            parts.append(f"tags={','.join(v)}")
        elif k == "owners":
            parts.append(f"a machine owned by {' or '.join(v)} (Python calls: values are unpickled by the client)")
        else:
            parts.append(f"{k}={v}")
    return ", ".join(parts)


def _gb(n: float) -> str:
    return f"{n / 2**30:.1f}GiB"  # as describe() writes the requirement


def _seen(values: list[str], limit: int = 6) -> str:
    vals = sorted(set(values))
    return ", ".join(vals[:limit]) + (", ..." if len(vals) > limit else "") if vals else "none"


def unmet_hints(req: Mapping[str, Any], machines: list[Mapping[str, Any]]) -> list[str]:
    """What the connected machines offer for each requirement none of them meets.

    For 'why does this wait' texts: ``ram>=64.0GiB`` alone does not say how
    far off the pool is, ``largest: 23.5 GB`` does.
    """
    if not machines:
        return ["no daemon is connected"]
    hints = []
    for key, want in req.items():
        if key == "owners" or any(_CHECKS[key](want, m) for m in machines):
            continue
        if key == "ram":
            hints.append(f"largest ram: {_gb(max(_number(m.get('ram')) for m in machines))}")
        elif key == "cores":
            hints.append(f"most cores: {max(int(_number(m.get('cores'))) for m in machines)}")
        elif key == "gpu":
            names = [str(g.get("name", "")) for m in machines for g in (m.get("gpus") or [])
                     if isinstance(g, Mapping)]
            hints.append(f"GPUs seen: {_seen(names)}")
        elif key == "os":
            hints.append(f"connected os: {_seen([str(m.get('os', '?')) for m in machines])}")
        elif key == "cpu":
            hints.append(f"connected cpus: {_seen([str(m.get('arch', '?')) for m in machines])}")
        elif key == "tags":
            hints.append(f"tags seen: {_seen([str(t) for m in machines for t in (m.get('tags') or [])])}")
        elif key == "daemon":
            hints.append(f"connected daemons: {_seen([str(m.get('name', '?')) for m in machines])}")
    if not hints and len(req) > 1:
        hints.append("each requirement is met somewhere, but no single daemon meets them all")
    return hints
