"""Which account a task runs as, and what it inherits from the daemon.

A task that runs as the daemon's own user can read the daemon's memory,
environment and files (same uid: ``/proc/PID/mem``, ``ptrace``; many
machines have no Yama to stop it), so the token and the blob cache are
only as safe as the least careful task.  Hence:

* a daemon running as root runs each slot's tasks as its own unprivileged
  uid (``slot_uid_base + k`` for the k-th slot it claims), like HTCondor's
  dedicated slot accounts: tasks of different slots cannot read each
  other's files or ``/proc`` entries, and after each task every process
  left running as the slot's uid is killed (leftovers.py), so nothing a
  task leaves behind spies on the slot's next task;
* ``--run-as USER`` runs every task as one existing account instead
  (leftovers are not killed there: the account may be a person's);
* ``--run-as self`` (or a daemon that is not root) keeps tasks as the
  daemon's user, with a warning saying what that exposes.

Several daemons on one machine must not share slot uids (one would kill
the other's tasks), so each claims its uids with an ``flock`` on a file in
a root-only directory, skipping uids another daemon holds: with a single
daemon, slot k runs as exactly ``slot_uid_base + k``.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import pwd
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping, Optional

from .leftovers import kill_processes_of

log = logging.getLogger(__name__)

# Far above regular accounts (1000+), systemd's dynamic users (61184-65519)
# and the usual subordinate-uid ranges of containers (100000 + 65536 * n).
DEFAULT_SLOT_UID_BASE = 1_900_000_000
_MAX_UID = 2**32 - 2
_CLAIM_SEARCH = 65536  # uids tried above the base before giving up

SAME_USER_WARNING = (
    "tasks run as the daemon's own user (uid %d): a task can then read the daemon's memory "
    "and environment, its hub token included (same uid; many machines have no Yama ptrace "
    "restriction). Run the daemon as root (tasks then run as unprivileged per-slot users) "
    "or with --run-as USER to avoid this."
)


class AccountError(ValueError):
    """The requested task account cannot be used; the message says why."""


@dataclass(frozen=True)
class TaskUser:
    """An account tasks run as (never the daemon's own)."""

    uid: int
    gid: int
    name: str
    per_slot: bool  # a dedicated slot uid: leftovers are killed after each task


Mode = Literal["self", "user", "slots"]


def _account_name(uid: int, default: str) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return default


def _resolve_user(spec: str) -> TaskUser:
    if spec.isdigit():
        uid = int(spec)
        if uid > _MAX_UID:
            raise AccountError(f"--run-as {spec}: not a valid uid")
        try:
            entry = pwd.getpwuid(uid)
            return TaskUser(uid, entry.pw_gid, entry.pw_name, per_slot=False)
        except KeyError:
            return TaskUser(uid, uid, spec, per_slot=False)
    try:
        entry = pwd.getpwnam(spec)
    except KeyError:
        raise AccountError(f"--run-as {spec}: no such user on this machine") from None
    return TaskUser(entry.pw_uid, entry.pw_gid, entry.pw_name, per_slot=False)


class TaskAccounts:
    """The account of each slot's tasks; ``user(k)`` is None for the daemon's own."""

    def __init__(self, mode: Mode, users: list[Optional[TaskUser]], locks: list[int]) -> None:
        self.mode = mode
        self._users = users
        self._locks = locks

    @classmethod
    def configure(
        cls,
        run_as: Optional[str],
        slots: int,
        slot_uid_base: int = DEFAULT_SLOT_UID_BASE,
        lock_dir: Optional[Path] = None,
    ) -> "TaskAccounts":
        """Decide from ``--run-as`` and the daemon's uid; claims slot uids if needed.

        ``run_as``: None (per-slot uids when root, else the daemon's user),
        ``"self"``, a user name or a numeric uid.
        """
        euid = os.geteuid()
        if run_as is not None and run_as.strip() == "":
            raise AccountError("--run-as needs a user name, a uid or 'self'")
        if run_as == "self":
            return cls("self", [None] * slots, [])
        if run_as is not None:
            user = _resolve_user(run_as)
            if user.uid == euid:
                return cls("self", [None] * slots, [])
            if euid != 0:
                raise AccountError(
                    f"--run-as {run_as}: cannot run tasks as another user without root "
                    f"(this daemon runs as uid {euid}); run it as root, or drop --run-as"
                )
            return cls("user", [user] * slots, [])
        if euid != 0:
            return cls("self", [None] * slots, [])
        if not 0 < slot_uid_base <= _MAX_UID - slots:
            raise AccountError(f"--slot-uid-base {slot_uid_base}: not a valid uid range start")
        users, locks = _claim_slot_uids(slots, slot_uid_base, lock_dir or _default_lock_dir())
        return cls("slots", users, locks)

    def user(self, slot: int) -> Optional[TaskUser]:
        return self._users[slot]

    @property
    def isolated(self) -> bool:
        """True when tasks run as another account than the daemon's."""
        return self.mode != "self"

    def describe(self) -> str:
        if self.mode == "slots":
            uids = [u.uid for u in self._users if u is not None]
            return f"tasks run as per-slot uids {', '.join(map(str, uids))}"
        if self.mode == "user":
            u = self._users[0]
            assert u is not None
            return f"tasks run as user {u.name} (uid {u.uid})"
        return f"tasks run as the daemon's own user (uid {os.geteuid()})"

    def close(self) -> None:
        """Release the slot uids for other daemons."""
        for fd in self._locks:
            try:
                os.close(fd)
            except OSError:
                pass
        self._locks = []


# ------------------------------------------------------------ slot uid claims


def _default_lock_dir() -> Path:
    run = Path("/run")
    if run.is_dir() and os.access(run, os.W_OK):
        return run / "hwf-slots"
    return Path(tempfile.gettempdir()) / f"hwf-slots-{os.geteuid()}"


def _private_dir(path: Path) -> None:
    """Create ``path`` as ours alone, or refuse one someone else could plant."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise AccountError(
            f"{path} must be a directory owned by uid {os.geteuid()} and writable only by it "
            "(it holds the locks that keep daemons from sharing slot uids)"
        )


def _claim_slot_uids(slots: int, base: int, lock_dir: Path) -> tuple[list[Optional[TaskUser]], list[int]]:
    _private_dir(lock_dir)
    users: list[Optional[TaskUser]] = []
    locks: list[int] = []
    uid = base
    while len(users) < slots:
        if uid >= min(base + _CLAIM_SEARCH, _MAX_UID):
            for fd in locks:
                os.close(fd)
            raise AccountError(f"no free slot uids from {base} on (held by other daemons)")
        fd = os.open(lock_dir / f"{uid}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            uid += 1
            continue
        locks.append(fd)
        user = TaskUser(uid, uid, _account_name(uid, f"hwf-slot-{len(users)}"), per_slot=True)
        # A daemon that died (kill -9) may have left this uid's tasks running.
        kill_processes_of(user)
        users.append(user)
        uid += 1
    return users, locks


# ----------------------------------------------------------------- environment


def task_env(
    base: Mapping[str, str],
    *,
    task_id: str,
    attempt: int,
    user: Optional[TaskUser] = None,
    home: Optional[Path] = None,
    tmpdir: Optional[Path] = None,
    extra: Optional[Mapping[str, str]] = None,
) -> dict[str, str]:
    """The daemon's environment minus every ``HWF_*`` variable, plus the task's own.

    ``extra`` (the spec's ``env``, checked by the hub) comes before the
    daemon's own ``HWF_TASK_ID``/``HWF_ATTEMPT``, so it cannot replace them.
    ``HWF_*`` goes because it carries the daemon's secrets (``HWF_TOKEN``);
    as another user, ``HOME`` points into the task dir (the daemon's own is not
    the task's to write) and ``USER``/``LOGNAME`` name the account; ``TMPDIR``
    is the task's own dir in every mode.
    """
    env = {k: v for k, v in base.items() if not k.startswith("HWF_")}
    if extra:
        env.update({k: v for k, v in extra.items() if k != "HWF_TOKEN"})
    env["HWF_TASK_ID"] = task_id
    env["HWF_ATTEMPT"] = str(attempt)
    if tmpdir is not None:  # every task its own, also where no namespace gives it a private /tmp
        env["TMPDIR"] = str(tmpdir)
    if user is not None:
        env["USER"] = env["LOGNAME"] = user.name
        if home is not None:
            env["HOME"] = str(home)
    return env
