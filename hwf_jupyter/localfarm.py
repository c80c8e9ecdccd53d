"""The per-user local farm that outlives a notebook kernel.

``%hwf_local`` starts a hub and daemons in their own sessions (not children
of the kernel's process group, no ``--parent-pid``), in a fixed state dir
(``$HWF_LOCAL_DIR`` or ``~/.hwf/local``, 0700).  A small JSON record there
(``farm.json``) names their pids, addresses and token files, so the next
``%hwf_local`` -- in a restarted kernel or another notebook of the same user --
finds the farm and attaches to it; the hub's SQLite store keeps sessions and
results, so ``%hwf_results --session S`` works again.

This module holds the record, the checks that a recorded pid is still the
process we started (pids get reused), and stopping a farm by its recorded
pids only.  ``LocalCluster(persistent=True)`` does the starting.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import psutil

RECORD_FILE = "farm.json"
LOCK_FILE = "farm.lock"
CLIENT_TOKEN_FILE = "client.token"
DAEMON_TOKEN_FILE = "daemon.token"
ENV_DIR = "HWF_LOCAL_DIR"
RECORD_VERSION = 1


class FarmRecordError(ValueError):
    """A farm record that cannot be read: names the field."""


def default_root() -> Path:
    """Where the user's local farm lives: ``$HWF_LOCAL_DIR`` or ``~/.hwf/local``."""
    env = os.environ.get(ENV_DIR)
    return Path(env).expanduser() if env else Path.home() / ".hwf" / "local"


def prepare_root(root: Path) -> Path:
    """Create ``root`` private (0700); refuse one another user owns, since its
    record decides which pids we signal and which tokens we send."""
    root = Path(root).expanduser().absolute()
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = root.stat()
    if st.st_uid != os.getuid():
        raise PermissionError(f"local farm dir {root} belongs to another user (uid {st.st_uid})")
    os.chmod(root, 0o700)
    return root


@dataclass
class FarmRecord:
    """What ``farm.json`` says about a running farm."""

    root: str
    address: str
    hub_pid: int
    port: int
    slots: int
    daemons: dict[str, int] = field(default_factory=dict)  # name -> pid
    http_port: Optional[int] = None
    http_url: Optional[str] = None
    client_token_file: str = ""
    daemon_token_file: str = ""
    admin_token_file: str = ""
    log_dir: str = ""
    started: float = 0.0
    version: int = RECORD_VERSION

    @property
    def pids(self) -> list[int]:
        """Daemons first: they stop at once on SIGINT, the hub after them."""
        return [*self.daemons.values(), self.hub_pid]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "FarmRecord":
        """Parse and check a record; a bad one raises FarmRecordError naming the field."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FarmRecordError(f"farm record is not JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise FarmRecordError("farm record is not a JSON object")
        if raw.get("version") != RECORD_VERSION:
            raise FarmRecordError(f"farm record field 'version': expected {RECORD_VERSION}, got {raw.get('version')!r}")

        def need(name: str, kind: type, optional: bool = False) -> Any:
            value = raw.get(name)
            if value is None and optional:
                return None
            if not isinstance(value, kind) or isinstance(value, bool):
                raise FarmRecordError(f"farm record field {name!r}: expected {kind.__name__}, got {value!r}")
            return value

        daemons = need("daemons", dict)
        for name, pid in daemons.items():
            if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 1:
                raise FarmRecordError(f"farm record field 'daemons': pid of {name!r} is {pid!r}")
        for name in ("hub_pid", "port"):
            if need(name, int) <= (1 if name == "hub_pid" else 0):
                raise FarmRecordError(f"farm record field {name!r}: {raw[name]!r} is out of range")
        if need("slots", int) < 1:
            raise FarmRecordError(f"farm record field 'slots': {raw['slots']!r} is out of range")
        return cls(
            root=need("root", str), address=need("address", str), hub_pid=raw["hub_pid"], port=raw["port"],
            slots=raw["slots"], daemons=dict(daemons), http_port=need("http_port", int, optional=True),
            http_url=need("http_url", str, optional=True),
            client_token_file=need("client_token_file", str), daemon_token_file=need("daemon_token_file", str),
            admin_token_file=need("admin_token_file", str), log_dir=need("log_dir", str),
            started=_number(raw, "started"),
        )


def _number(raw: dict, name: str) -> float:
    value = raw.get(name)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise FarmRecordError(f"farm record field {name!r}: expected a number, got {value!r}")
    return float(value)


def read_record(root: Path) -> Optional[FarmRecord]:
    """The record in ``root``, or None if there is none (or it is unreadable:
    then the farm is treated as gone and started afresh)."""
    try:
        return FarmRecord.from_json((Path(root) / RECORD_FILE).read_text())
    except FileNotFoundError:
        return None
    except FarmRecordError:
        return None


def write_record(root: Path, record: FarmRecord) -> None:
    """Write the record atomically, readable by the user only."""
    path = Path(root) / RECORD_FILE
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(record.to_json() + "\n")
    os.replace(tmp, path)


def remove_record(root: Path) -> None:
    (Path(root) / RECORD_FILE).unlink(missing_ok=True)


@contextlib.contextmanager
def farm_lock(root: Path) -> Iterator[None]:
    """One kernel at a time finds-or-starts (or stops) the farm."""
    fd = os.open(Path(root) / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def is_farm_process(pid: int, root: str | os.PathLike) -> bool:
    """True if ``pid`` runs (not a zombie) and is a hub or daemon of the farm in
    ``root``: its argv names that dir.  A reused pid is never ours."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE or proc.uids().real != os.getuid():
            return False
        argv = proc.cmdline()
    except (psutil.Error, OSError):
        return False
    modules = {"hub_server", "hwf_daemon"}
    root = str(root)
    return any(a in modules for a in argv) and any(a == root or a.startswith(root + os.sep) for a in argv)


class AdoptedProcess:
    """A farm process started by another (maybe dead) kernel, driven by pid
    like a ``subprocess.Popen``; every signal re-checks it is still ours."""

    def __init__(self, pid: int, root: str | os.PathLike) -> None:
        self.pid = pid
        self.root = str(root)
        self.returncode: Optional[int] = None

    def poll(self) -> Optional[int]:
        if self.returncode is None and not is_farm_process(self.pid, self.root):
            self.returncode = -1  # not our child: its real code is unknown
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout: Optional[float] = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0)
            time.sleep(0.05)
        return self.returncode  # type: ignore[return-value]


def shape_conflict(record: FarmRecord, daemons: Optional[int], slots: Optional[int]) -> Optional[str]:
    """Why a running farm does not fit ``--daemons``/``--slots`` (None: it fits)."""
    have, have_slots = len(record.daemons), record.slots
    if (daemons is None or daemons == have) and (slots is None or slots == have_slots):
        return None
    want_d = have if daemons is None else daemons
    want_s = have_slots if slots is None else slots
    return (f"the local farm in {record.root} runs {have} daemon(s) x {have_slots} slot(s), not "
            f"{want_d} x {want_s}; to change it: %hwf_local --stop (ends its running tasks), then "
            f"%hwf_local --daemons {want_d} --slots {want_s}; or run %hwf_local without options to use it as it is")


def stop_processes(procs: list[Any], grace: float = 5.0) -> None:
    """SIGINT (daemons stop at once; SIGTERM would drain their running tasks),
    then SIGKILL after ``grace``: Popen objects or ``AdoptedProcess``es."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)


def stop_farm(root: Path, grace: float = 5.0) -> list[int]:
    """Stop the farm recorded in ``root``: SIGINT to its recorded pids that are
    still its processes, SIGKILL after ``grace``; returns the pids stopped."""
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        return []
    with farm_lock(root):
        record = read_record(root)
        if record is None:
            return []
        procs = [AdoptedProcess(pid, record.root) for pid in record.pids]
        live = [p for p in procs if p.poll() is None]
        stop_processes(live, grace)
        remove_record(root)
        return [p.pid for p in live]


def read_secret(path: Path) -> Optional[str]:
    try:
        text = Path(path).read_text().strip()
    except FileNotFoundError:
        return None
    return text or None


def write_secret(path: Path, secret: str) -> None:
    """A token file, 0600 from its creation."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    os.chmod(path, 0o600)
