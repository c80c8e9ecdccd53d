"""The hub's durable state: SQLite in WAL mode under the state directory.

Every accepted task, every state transition (with its time), every attempt,
every result and every machine is written here before the hub acts on it,
so a hub killed with SIGKILL and restarted on the same directory loses
nothing it had acknowledged.

The store carries its schema version (SQLite's ``user_version``).  Opening
an older store migrates it in place, after saving a copy of it beside it
(``hub.sqlite3.schema1.bak``); a store written by a newer HWF is refused,
untouched, with a message saying so.  Every migration step can run twice,
so a migration cut off by a crash simply runs again.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import msgspec

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (
    hash TEXT PRIMARY KEY, role TEXT NOT NULL, label TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL, token_id TEXT, user TEXT NOT NULL DEFAULT '', revoked REAL);
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY, created REAL NOT NULL, user TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS tasks (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id TEXT UNIQUE NOT NULL,
    session_id TEXT NOT NULL,
    spec BLOB NOT NULL,
    requirements BLOB NOT NULL,
    priority INTEGER NOT NULL,
    max_retries INTEGER NOT NULL,
    status TEXT NOT NULL,
    submitted REAL NOT NULL,
    queued REAL,
    started REAL,
    finished REAL,
    machine TEXT,
    attempt INTEGER NOT NULL DEFAULT 0,
    exit_code INTEGER,
    error TEXT,
    reason TEXT,
    result BLOB,
    result_attempt INTEGER,
    user TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS tasks_session ON tasks(session_id);
CREATE INDEX IF NOT EXISTS tasks_status ON tasks(status);
CREATE TABLE IF NOT EXISTS attempts (
    task_id TEXT NOT NULL, attempt INTEGER NOT NULL, machine TEXT NOT NULL,
    state TEXT NOT NULL, assigned REAL, started REAL, ended REAL, reason TEXT,
    instance TEXT, PRIMARY KEY (task_id, attempt));
CREATE TABLE IF NOT EXISTS submits (
    key TEXT PRIMARY KEY, session_id TEXT NOT NULL, task_ids BLOB NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS transitions (
    task_id TEXT NOT NULL, state TEXT NOT NULL, at REAL NOT NULL,
    attempt INTEGER, reason TEXT);
CREATE INDEX IF NOT EXISTS transitions_task ON transitions(task_id);
CREATE TABLE IF NOT EXISTS machines (
    machine_id TEXT PRIMARY KEY, name TEXT NOT NULL, hardware BLOB NOT NULL,
    slots INTEGER NOT NULL, tags BLOB NOT NULL, state TEXT NOT NULL,
    first_seen REAL NOT NULL, last_seen REAL NOT NULL, load BLOB, instance TEXT,
    owner TEXT NOT NULL DEFAULT '');
-- Who may read a blob: 'u:<user>' for a user's uploads and artifacts,
-- 'd:<owner>' for blobs a daemon owner's machines uploaded.
CREATE TABLE IF NOT EXISTS blob_refs (
    sha256 TEXT NOT NULL, principal TEXT NOT NULL, PRIMARY KEY (sha256, principal)) WITHOUT ROWID;
-- Credit slots (CreditPiggy).  owner NULL on a claimed slot: pending payout
-- until its machine is linked to a user.
CREATE TABLE IF NOT EXISTS credit_slots (
    slot TEXT PRIMARY KEY, state TEXT NOT NULL, user TEXT NOT NULL,
    session_id TEXT, task_id TEXT, credits INTEGER, min INTEGER, max INTEGER,
    machine TEXT, owner TEXT, reason TEXT,
    allocated REAL NOT NULL, expires REAL, ended REAL);
CREATE INDEX IF NOT EXISTS credit_slots_due ON credit_slots(expires) WHERE state = 'allocated';
CREATE INDEX IF NOT EXISTS credit_slots_machine ON credit_slots(machine);
CREATE TABLE IF NOT EXISTS credit_counters (
    slot TEXT NOT NULL, name TEXT NOT NULL, value REAL NOT NULL, PRIMARY KEY (slot, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS credit_meta (
    slot TEXT NOT NULL, name TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (slot, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS credit_links (
    machine TEXT PRIMARY KEY, user TEXT NOT NULL, linked REAL NOT NULL);
-- A Manager API job's file (its jobfile zip), per user: GET /tasks/file/{job_id}.
CREATE TABLE IF NOT EXISTS job_files (
    user TEXT NOT NULL, job_id TEXT NOT NULL, sha256 TEXT NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (user, job_id)) WITHOUT ROWID;
"""

# 1: HWF 0.1 (no users).  2: users on tokens, sessions and tasks; token ids and
# revocation; machine owners; blob access (HWF 0.2).  3: the credit ledger
# (new tables only: an older store gets them empty).  4: the Manager API: task
# progress, hidden tasks, external/job ids, job files; machines' admin switch.
# 5: user credit slots keyed ``USER/NAME`` (names per user; task slots keep
# the task id).
SCHEMA_VERSION = 5


class SchemaError(RuntimeError):
    """The store's schema is one this HWF cannot use; the text says what to do."""


# Columns added after the first release: (table, column, declaration).
# Stores made before them get the column on open, with its default.
ADDED_COLUMNS = (
    ("tokens", "token_id", "TEXT"),
    ("tokens", "user", "TEXT NOT NULL DEFAULT ''"),
    ("tokens", "revoked", "REAL"),
    ("sessions", "user", "TEXT NOT NULL DEFAULT ''"),
    ("tasks", "user", "TEXT NOT NULL DEFAULT ''"),
    ("machines", "owner", "TEXT NOT NULL DEFAULT ''"),
    ("tasks", "progress", "REAL"),
    ("tasks", "frame_current", "INTEGER"),
    ("tasks", "hidden", "INTEGER NOT NULL DEFAULT 0"),
    ("tasks", "external_id", "TEXT"),
    ("tasks", "job_id", "TEXT"),
    ("machines", "admin_status", "TEXT NOT NULL DEFAULT 'enabled'"),
    ("blob_refs", "size", "INTEGER"),  # the blob's bytes, for per-user quotas (NULL: not yet known)
)
POST_MIGRATION = """
CREATE INDEX IF NOT EXISTS tasks_user_status ON tasks(user, status);
CREATE INDEX IF NOT EXISTS tasks_user_external ON tasks(user, external_id) WHERE external_id IS NOT NULL;
CREATE UNIQUE INDEX IF NOT EXISTS tokens_id ON tokens(token_id);
CREATE INDEX IF NOT EXISTS blob_refs_principal ON blob_refs(principal);
UPDATE tokens SET token_id = 'tok-' || substr(hash, 1, 10) WHERE token_id IS NULL;
UPDATE tokens SET user = CASE role WHEN 'admin' THEN 'admin' ELSE 'default' END WHERE user = '';
UPDATE sessions SET user = 'default' WHERE user = '';
UPDATE tasks SET user = 'default' WHERE user = '';
"""

TASK_COLUMNS = (
    "task_id, session_id, spec, requirements, priority, max_retries, status, submitted, "
    "queued, started, finished, machine, attempt, exit_code, error, reason, result, "
    "result_attempt, seq, user, progress, frame_current, hidden, external_id, job_id"
)

_json = msgspec.json.Encoder()
_unjson = msgspec.json.Decoder()


def dumps(obj: Any) -> bytes:
    return _json.encode(obj)


def loads(data: Optional[bytes]) -> Any:
    return None if data is None else _unjson.decode(data)


class Store:
    """One SQLite connection, used from the hub's event-loop thread only."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        # Private from the first byte: SQLite creates the -wal and -shm files
        # with the database file's mode.
        old_umask = os.umask(0o077)
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA busy_timeout=5000")
            version = self._check_version()
            self.db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a committed transaction survives a process
            # crash (SIGKILL); only an OS crash can lose the latest commits.
            self.db.execute("PRAGMA synchronous=NORMAL")
            if version is not None:
                self._backup(version)
            self.db.executescript(SCHEMA)
            self._migrate()
            if version is not None:
                self._grant_old_blobs()
            if version is not None and version < 5:
                self._namespace_credit_slots()
            self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        finally:
            os.umask(old_umask)
        for suffix in ("", "-wal", "-shm"):
            f = Path(f"{self.path}{suffix}")
            if f.exists():
                os.chmod(f, 0o600)  # whatever mode an older version left
        self._checkpointer: Optional[threading.Thread] = None
        self._stop_checkpoints = threading.Event()

    def checkpoint_in_background(self, interval: float = 1.0) -> None:
        """Move WAL pages into the database from a thread of its own.

        SQLite's automatic checkpoint runs inside whichever commit crosses
        1,000 pages: that commit then takes 100-200 ms, and the hub's event
        loop with it.  A PASSIVE checkpoint on another connection does the
        same work without blocking writers (sqlite3 releases the GIL)."""
        self.db.execute("PRAGMA wal_autocheckpoint=0")

        def run() -> None:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA busy_timeout=5000")
            try:
                while not self._stop_checkpoints.wait(interval):
                    try:
                        db.execute("PRAGMA wal_checkpoint(PASSIVE)")
                    except sqlite3.Error:
                        pass  # busy: the next round catches up
            finally:
                db.close()

        self._checkpointer = threading.Thread(target=run, name="hwf-wal-checkpoint", daemon=True)
        self._checkpointer.start()

    def _check_version(self) -> Optional[int]:
        """The version of an existing older store (to migrate), None if new or current."""
        have = self.db.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if have > SCHEMA_VERSION:
            self.db.close()
            from . import __version__
            raise SchemaError(
                f"{self.path} was written by a newer HWF (store schema {have}; HWF {__version__} "
                f"reads schema {SCHEMA_VERSION} and older). Upgrade HWF to use it, or give another "
                "--state-dir; nothing was changed."
            )
        if "tasks" not in tables or have == SCHEMA_VERSION:
            return None
        return have or 1  # HWF 0.1 did not set user_version

    def _backup(self, version: int) -> None:
        """A consistent copy of the store before migrating it (SQLite's backup API)."""
        dest = self.path.with_name(f"{self.path.name}.schema{version}.bak")
        if not dest.exists():
            copy = sqlite3.connect(dest)
            try:
                self.db.backup(copy)
            finally:
                copy.close()
            os.chmod(dest, 0o600)

    def _grant_old_blobs(self) -> None:
        """Stores from before blob access control: each task's user may read its
        Data and artifacts, as they could before."""
        refs = set()
        for user, spec, result in self.db.execute("SELECT user, spec, result FROM tasks"):
            scope = f"u:{user}"
            for stage in loads(spec).get("stages", []):
                refs.update((d["sha256"], scope, d.get("size")) for d in stage.get("data", []))
            if result is not None:
                refs.update((a["sha256"], scope, a.get("size"))
                            for a in loads(result).get("artifacts", []) if a.get("sha256"))
        self.add_blob_refs(refs)

    def _namespace_credit_slots(self) -> None:
        """Schema 5: a user's slot NAME is stored as ``USER/NAME`` (with its
        counters and meta), so two users' "job-17" are two slots.  In two
        steps, through keys no slot has, so no new key meets an old one."""
        with self.transaction():
            for table in ("credit_counters", "credit_meta"):
                self.db.execute(
                    f"UPDATE {table} SET slot = (SELECT char(1) || s.user || '/' || s.slot FROM credit_slots s "
                    f"WHERE s.slot = {table}.slot) "
                    f"WHERE slot IN (SELECT slot FROM credit_slots WHERE task_id IS NULL)")
            self.db.execute("UPDATE credit_slots SET slot = char(1) || user || '/' || slot WHERE task_id IS NULL")
            for table in ("credit_slots", "credit_counters", "credit_meta"):
                self.db.execute(f"UPDATE {table} SET slot = substr(slot, 2) WHERE slot LIKE char(1) || '%'")

    def _migrate(self) -> None:
        for table, column, decl in ADDED_COLUMNS:
            have = {r[1] for r in self.db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
        self.db.executescript(POST_MIGRATION)

    def data_version(self) -> int:
        """Changes whenever another connection (e.g. ``hwf token``) commits."""
        return self.db.execute("PRAGMA data_version").fetchone()[0]

    def close(self) -> None:
        if self._checkpointer is not None:
            self._stop_checkpoints.set()
            self._checkpointer.join()
        self.db.close()

    def transaction(self) -> "_Tx":
        return _Tx(self.db)

    # -- meta / tokens ------------------------------------------------------

    def meta(self, key: str) -> Optional[str]:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def add_token(self, token_hash: str, token_id: str, role: str, user: str, label: str = "") -> None:
        self.db.execute(
            "INSERT INTO tokens(hash, token_id, role, user, label, created) VALUES (?, ?, ?, ?, ?, ?)",
            (token_hash, token_id, role, user, label, time.time()),
        )

    def token(self, token_hash: str) -> Optional[sqlite3.Row]:
        q = "SELECT token_id, role, user, revoked FROM tokens WHERE hash=?"
        return self.db.execute(q, (token_hash,)).fetchone()

    def tokens(self) -> list[sqlite3.Row]:
        q = "SELECT token_id, role, user, label, created, revoked FROM tokens ORDER BY created"
        return self.db.execute(q).fetchall()

    def revoke_tokens(self, *, token_ids: Sequence[str] = (), user: Optional[str] = None) -> list[str]:
        """Mark tokens revoked (by id, or all of a user's); returns the ids revoked now."""
        now = time.time()
        if user is None and not token_ids:
            return []
        with self.transaction():
            if user is not None:
                rows = self.db.execute(
                    "SELECT token_id FROM tokens WHERE user=? AND revoked IS NULL", (user,)).fetchall()
            else:
                marks = ",".join("?" * len(token_ids))
                rows = self.db.execute(
                    f"SELECT token_id FROM tokens WHERE token_id IN ({marks}) AND revoked IS NULL",
                    list(token_ids)).fetchall()
            ids = [r[0] for r in rows]
            self.db.executemany("UPDATE tokens SET revoked=? WHERE token_id=?", [(now, i) for i in ids])
        return ids

    def known_token_ids(self, token_ids: Sequence[str]) -> set[str]:
        marks = ",".join("?" * len(token_ids))
        q = f"SELECT token_id FROM tokens WHERE token_id IN ({marks})"
        return {r[0] for r in self.db.execute(q, list(token_ids))}

    def revoked_token_ids(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT token_id FROM tokens WHERE revoked IS NOT NULL")}

    # -- blob access ----------------------------------------------------------

    def add_blob_refs(self, refs: Iterable[tuple[str, str, Optional[int]]]) -> None:
        """(sha256, principal, size): that principal may read that blob (of that many bytes)."""
        self.db.executemany("INSERT OR IGNORE INTO blob_refs(sha256, principal, size) VALUES (?, ?, ?)",
                            list(refs))

    def blob_bytes(self, principal: str) -> int:
        """Bytes of the blobs listed for ``principal``: what its quota counts."""
        q = "SELECT COALESCE(SUM(size), 0) FROM blob_refs WHERE principal=?"
        return int(self.db.execute(q, (principal,)).fetchone()[0])

    def blobs_without_size(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT DISTINCT sha256 FROM blob_refs WHERE size IS NULL")]

    def set_blob_sizes(self, sizes: dict[str, int]) -> None:
        self.db.executemany("UPDATE blob_refs SET size=? WHERE sha256=?", [(n, s) for s, n in sizes.items()])

    def drop_blob_refs(self, shas: Iterable[str]) -> None:
        """Blobs deleted from the store: nobody may read them, no quota counts them."""
        self.db.executemany("DELETE FROM blob_refs WHERE sha256=?", [(s,) for s in shas])

    def blob_ref_exists(self, sha256: str, principal: str) -> bool:
        q = "SELECT 1 FROM blob_refs WHERE sha256=? AND principal=?"
        return self.db.execute(q, (sha256, principal)).fetchone() is not None

    # -- tasks --------------------------------------------------------------

    def add_session(self, session_id: str, at: float, user: str) -> None:
        self.db.execute(
            "INSERT OR IGNORE INTO sessions(session_id, created, user) VALUES (?, ?, ?)",
            (session_id, at, user),
        )

    def session(self, session_id: str) -> Optional[sqlite3.Row]:
        q = "SELECT session_id, created, user FROM sessions WHERE session_id=?"
        return self.db.execute(q, (session_id,)).fetchone()

    def session_counts(self, session_id: str) -> dict[str, int]:
        q = "SELECT status, count(*) FROM tasks WHERE session_id=? GROUP BY status"
        return {status: n for status, n in self.db.execute(q, (session_id,))}

    def insert_tasks(self, rows: Iterable[tuple]) -> None:
        """rows: (seq, task_id, session_id, spec, requirements, priority, max_retries, user,
        external_id, job_id, at)."""
        rows = list(rows)
        self.db.executemany(
            "INSERT INTO tasks(seq, task_id, session_id, spec, requirements, priority, max_retries, "
            "user, external_id, job_id, status, submitted, queued) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?)",
            [(*r, r[-1]) for r in rows],
        )
        self.db.executemany(
            "INSERT INTO transitions(task_id, state, at) VALUES (?, 'queued', ?)",
            [(r[1], r[-1]) for r in rows],
        )

    def set_task_fields(self, task_id: str, **fields: Any) -> None:
        """Columns that are not a state change (priority, progress, hidden)."""
        cols = ", ".join(f"{k}=?" for k in fields)
        self.db.execute(f"UPDATE tasks SET {cols} WHERE task_id=?", (*fields.values(), task_id))

    def task_by_external_id(self, user: str, external_id: str) -> Optional[str]:
        q = "SELECT task_id FROM tasks WHERE user=? AND external_id=? ORDER BY seq DESC LIMIT 1"
        row = self.db.execute(q, (user, external_id)).fetchone()
        return row[0] if row else None

    def list_tasks(self, *, user: Optional[str], statuses: Sequence[str] = (), session_id: Optional[str] = None,
                   machine: Optional[str] = None, job_id: Optional[str] = None,
                   external_id: Optional[str] = None, include_hidden: bool = False,
                   offset: int = 0, limit: int = 100, brief: bool = False) -> tuple[list[sqlite3.Row], int]:
        """A page of tasks (newest first) and how many match in all; ``user`` None: anyone's.
        ``brief``: the result column is not read (it holds every command's output)."""
        where, args = [], []
        for col, val in (("user", user), ("session_id", session_id), ("machine", machine),
                         ("job_id", job_id), ("external_id", external_id)):
            if val is not None:
                where.append(f"{col}=?")
                args.append(val)
        if statuses:
            where.append(f"status IN ({','.join('?' * len(statuses))})")
            args.extend(statuses)
        if not include_hidden:
            where.append("hidden=0")
        cond = f"WHERE {' AND '.join(where)}" if where else ""
        total = self.db.execute(f"SELECT count(*) FROM tasks {cond}", args).fetchone()[0]
        columns = TASK_COLUMNS.replace(" result,", " NULL AS result,") if brief else TASK_COLUMNS
        rows = self.db.execute(f"SELECT {columns} FROM tasks {cond} ORDER BY seq DESC LIMIT ? OFFSET ?",
                               (*args, limit, offset)).fetchall()
        return rows, total

    def sessions_of(self, user: Optional[str], limit: int = 50) -> list[dict[str, Any]]:
        """The newest sessions (of ``user``, or anyone's) with task counts by status, in one query
        (the status page asks every half second)."""
        cond, args = ("WHERE user=?", [user]) if user is not None else ("", [])
        q = (f"SELECT s.session_id, s.created, s.user, t.status, count(t.task_id) FROM "
             f"(SELECT session_id, created, user FROM sessions {cond} ORDER BY created DESC LIMIT ?) s "
             "LEFT JOIN tasks t ON t.session_id = s.session_id "
             "GROUP BY s.session_id, t.status ORDER BY s.created DESC, s.session_id")
        out: dict[str, dict[str, Any]] = {}
        for sid, created, owner, status, n in self.db.execute(q, (*args, limit)):
            row = out.setdefault(sid, {"session_id": sid, "created": created, "user": owner, "counts": {}})
            if status is not None:
                row["counts"][status] = n
        return list(out.values())

    def set_job_file(self, user: str, job_id: str, sha256: str, at: float) -> None:
        self.db.execute("INSERT INTO job_files(user, job_id, sha256, created) VALUES (?, ?, ?, ?) "
                        "ON CONFLICT(user, job_id) DO UPDATE SET sha256=excluded.sha256, created=excluded.created",
                        (user, job_id, sha256, at))

    def job_file(self, user: str, job_id: str) -> Optional[str]:
        row = self.db.execute("SELECT sha256 FROM job_files WHERE user=? AND job_id=?", (user, job_id)).fetchone()
        return row[0] if row else None

    def set_machine_admin_status(self, machine_id: str, status: str) -> None:
        self.db.execute("UPDATE machines SET admin_status=? WHERE machine_id=?", (status, machine_id))

    def max_seq(self) -> int:
        return self.db.execute("SELECT coalesce(max(seq), 0) FROM tasks").fetchone()[0]

    def set_status(
        self,
        task_id: str,
        status: str,
        at: float,
        *,
        attempt: Optional[int] = None,
        reason: Optional[str] = None,
        **fields: Any,
    ) -> None:
        cols = ["status=?"]
        vals: list[Any] = [status]
        if attempt is not None:
            cols.append("attempt=?")
            vals.append(attempt)
        if status in ("finished", "failed", "cancelled"):
            cols.append("reason=?")  # on the task row: why it ended
            vals.append(reason)
        for k, v in fields.items():
            cols.append(f"{k}=?")
            vals.append(v)
        vals.append(task_id)
        self.db.execute(f"UPDATE tasks SET {', '.join(cols)} WHERE task_id=?", vals)
        self.db.execute(
            "INSERT INTO transitions(task_id, state, at, attempt, reason) VALUES (?, ?, ?, ?, ?)",
            (task_id, status, at, attempt, reason),
        )

    def add_attempt(self, task_id: str, attempt: int, machine: str, instance: str, at: float) -> None:
        self.db.execute(
            "INSERT INTO attempts(task_id, attempt, machine, instance, state, assigned) "
            "VALUES (?, ?, ?, ?, 'assigned', ?)",
            (task_id, attempt, machine, instance, at),
        )

    def submitted_before(self, key: str) -> Optional[tuple[str, list[str]]]:
        row = self.db.execute("SELECT session_id, task_ids FROM submits WHERE key=?", (key,)).fetchone()
        return (row[0], loads(row[1])) if row else None

    def remember_submit(self, key: str, session_id: str, task_ids: list[str], at: float) -> None:
        self.db.execute(
            "INSERT INTO submits(key, session_id, task_ids, created) VALUES (?, ?, ?, ?)",
            (key, session_id, dumps(task_ids), at),
        )

    def update_attempt(self, task_id: str, attempt: int, **fields: Any) -> None:
        cols = ", ".join(f"{k}=?" for k in fields)
        self.db.execute(
            f"UPDATE attempts SET {cols} WHERE task_id=? AND attempt=?",
            (*fields.values(), task_id, attempt),
        )

    def tasks(self, task_ids: Sequence[str]) -> dict[str, sqlite3.Row]:
        out: dict[str, sqlite3.Row] = {}
        for chunk in _chunks(task_ids, 500):
            marks = ",".join("?" * len(chunk))
            q = f"SELECT {TASK_COLUMNS} FROM tasks WHERE task_id IN ({marks})"
            for row in self.db.execute(q, chunk):
                out[row["task_id"]] = row
        return out

    def task_users(self, task_ids: Sequence[str]) -> dict[str, str]:
        """Whose each task is (only that column: a tenancy check loads no outputs)."""
        out: dict[str, str] = {}
        for chunk in _chunks(task_ids, 500):
            marks = ",".join("?" * len(chunk))
            out.update(self.db.execute(f"SELECT task_id, user FROM tasks WHERE task_id IN ({marks})", chunk).fetchall())
        return out

    def reply_bytes(self, task_ids: Sequence[str]) -> int:
        """About how many bytes the records of these tasks take (their spec and
        result), read without loading them: a reply is sized before it is built."""
        sizes: dict[str, int] = {}
        for chunk in _chunks(list(dict.fromkeys(task_ids)), 500):
            marks = ",".join("?" * len(chunk))
            q = f"SELECT task_id, length(spec) + coalesce(length(result), 0) FROM tasks WHERE task_id IN ({marks})"
            sizes.update(self.db.execute(q, chunk).fetchall())
        return sum(sizes.get(tid, 0) for tid in task_ids)

    def attempts(self, task_ids: Sequence[str]) -> dict[str, list[sqlite3.Row]]:
        out: dict[str, list[sqlite3.Row]] = {}
        for chunk in _chunks(task_ids, 500):
            marks = ",".join("?" * len(chunk))
            q = f"SELECT * FROM attempts WHERE task_id IN ({marks}) ORDER BY task_id, attempt"
            for row in self.db.execute(q, chunk):
                out.setdefault(row["task_id"], []).append(row)
        return out

    def session_task_ids(self, session_id: str) -> list[str]:
        q = "SELECT task_id FROM tasks WHERE session_id=? ORDER BY seq"
        return [r[0] for r in self.db.execute(q, (session_id,))]

    def active_tasks(self) -> list[sqlite3.Row]:
        q = (
            f"SELECT {TASK_COLUMNS} FROM tasks "
            "WHERE status NOT IN ('finished', 'failed', 'cancelled') ORDER BY seq"
        )
        return self.db.execute(q).fetchall()

    def lost_attempt_exclusions(self) -> list[sqlite3.Row]:
        """(task_id, machine, instance) of attempts lost by a daemon's fault."""
        q = ("SELECT task_id, machine, instance FROM attempts "
             "WHERE state='lost' AND reason NOT LIKE 'not delivered%'")
        return self.db.execute(q).fetchall()

    def attempt_machine(self, task_id: str, attempt: int) -> Optional[str]:
        q = "SELECT machine FROM attempts WHERE task_id=? AND attempt=?"
        row = self.db.execute(q, (task_id, attempt)).fetchone()
        return row[0] if row else None

    def active_attempts(self) -> list[sqlite3.Row]:
        q = "SELECT * FROM attempts WHERE state IN ('assigned', 'running')"
        return self.db.execute(q).fetchall()

    def count_active(self) -> int:
        q = "SELECT count(*) FROM tasks WHERE status NOT IN ('finished', 'failed', 'cancelled')"
        return self.db.execute(q).fetchone()[0]

    # -- machines -----------------------------------------------------------

    def upsert_machine(
        self, machine_id: str, name: str, hardware: dict, slots: int, tags: list[str], at: float,
        instance: str = "", owner: str = "",
    ) -> None:
        self.db.execute(
            "INSERT INTO machines(machine_id, name, hardware, slots, tags, state, first_seen, last_seen, "
            "instance, owner) VALUES (?, ?, ?, ?, ?, 'online', ?, ?, ?, ?) ON CONFLICT(machine_id) DO UPDATE "
            "SET name=excluded.name, hardware=excluded.hardware, slots=excluded.slots, "
            "tags=excluded.tags, state='online', last_seen=excluded.last_seen, instance=excluded.instance, "
            "owner=excluded.owner",
            (machine_id, name, dumps(hardware), slots, dumps(tags), at, at, instance, owner),
        )

    def set_machine_state(self, machine_id: str, state: str, at: float, load: Any = None) -> None:
        if load is None:
            q = "UPDATE machines SET state=?, last_seen=? WHERE machine_id=?"
            self.db.execute(q, (state, at, machine_id))
        else:
            q = "UPDATE machines SET state=?, last_seen=?, load=? WHERE machine_id=?"
            self.db.execute(q, (state, at, dumps(load), machine_id))

    def machines(self) -> list[sqlite3.Row]:
        return self.db.execute("SELECT * FROM machines ORDER BY first_seen").fetchall()

    def mark_all_machines_offline(self) -> None:
        self.db.execute("UPDATE machines SET state='offline' WHERE state!='offline'")


    # -- credit ledger (rules in ledger.py) -----------------------------------

    SLOT_COLUMNS = ("slot, state, user, session_id, task_id, credits, min, max, machine, owner, "
                    "reason, allocated, expires, ended")

    def credit_slot(self, slot: str) -> Optional[sqlite3.Row]:
        return self.db.execute(
            f"SELECT {self.SLOT_COLUMNS} FROM credit_slots WHERE slot = ?", (slot,)).fetchone()

    def add_credit_slots(self, rows: Iterable[tuple]) -> None:
        """rows: (slot, user, session_id, task_id, credits, min, max, allocated, expires)."""
        self.db.executemany(
            "INSERT INTO credit_slots (slot, state, user, session_id, task_id, credits, min, max, "
            "allocated, expires) VALUES (?, 'allocated', ?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def claim_credit_slot(self, slot: str, machine: str, credits: int, owner: Optional[str],
                          at: float, counters: dict[str, float]) -> bool:
        """Claim an allocated slot; False (nothing changed) when it is not one."""
        cur = self.db.execute(
            "UPDATE credit_slots SET state = 'claimed', machine = ?, credits = ?, owner = ?, ended = ? "
            "WHERE slot = ? AND state = 'allocated'", (machine, credits, owner, at, slot))
        if cur.rowcount:
            self.add_credit_counters(slot, counters)
        return bool(cur.rowcount)

    def end_credit_slot(self, slot: str, state: str, reason: Optional[str], at: float) -> bool:
        """End an allocated slot as ``state``; False when it is not one."""
        cur = self.db.execute("UPDATE credit_slots SET state = ?, reason = ?, ended = ? "
                              "WHERE slot = ? AND state = 'allocated'", (state, reason, at, slot))
        return bool(cur.rowcount)

    def set_credit_counters(self, slot: str, counters: dict[str, float]) -> None:
        self.db.executemany(
            "INSERT INTO credit_counters (slot, name, value) VALUES (?, ?, ?) "
            "ON CONFLICT (slot, name) DO UPDATE SET value = excluded.value",
            [(slot, k, v) for k, v in counters.items()])

    def add_credit_counters(self, slot: str, counters: dict[str, float]) -> None:
        self.db.executemany(
            "INSERT INTO credit_counters (slot, name, value) VALUES (?, ?, ?) "
            "ON CONFLICT (slot, name) DO UPDATE SET value = value + excluded.value",
            [(slot, k, v) for k, v in counters.items()])

    def set_credit_meta(self, slot: str, meta: dict[str, str]) -> None:
        self.db.executemany(
            "INSERT INTO credit_meta (slot, name, value) VALUES (?, ?, ?) "
            "ON CONFLICT (slot, name) DO UPDATE SET value = excluded.value",
            [(slot, k, v) for k, v in meta.items()])

    def expire_credit_slots(self, now: float) -> int:
        """Allocated slots past their expiry become expired; returns how many."""
        cur = self.db.execute(
            "UPDATE credit_slots SET state = 'expired', reason = 'expired', ended = expires "
            "WHERE state = 'allocated' AND expires IS NOT NULL AND expires <= ?", (now,))
        return cur.rowcount

    def next_credit_expiry(self) -> Optional[float]:
        return self.db.execute(
            "SELECT min(expires) FROM credit_slots WHERE state = 'allocated'").fetchone()[0]

    def credit_link(self, machine: str) -> Optional[str]:
        row = self.db.execute("SELECT user FROM credit_links WHERE machine = ?", (machine,)).fetchone()
        return row[0] if row else None

    def link_credit_machine(self, machine: str, user: str, at: float) -> tuple[int, int]:
        """Link a machine to a user and pay its pending credits; returns (credits, slots) paid."""
        self.db.execute(
            "INSERT INTO credit_links (machine, user, linked) VALUES (?, ?, ?) "
            "ON CONFLICT (machine) DO UPDATE SET user = excluded.user, linked = excluded.linked",
            (machine, user, at))
        credits, slots = self.db.execute(
            "SELECT coalesce(sum(credits), 0), count(*) FROM credit_slots "
            "WHERE machine = ? AND state = 'claimed' AND owner IS NULL", (machine,)).fetchone()
        self.db.execute("UPDATE credit_slots SET owner = ? WHERE machine = ? AND state = 'claimed' "
                        "AND owner IS NULL", (user, machine))
        return credits, slots

    _TALLY_KEYS = {"machine": "s.machine", "owner": "s.owner", "user": "s.user", "session": "s.session_id"}

    def credit_tally(self, by: str, user: Optional[str] = None) -> list[dict[str, Any]]:
        """Totals over claimed slots grouped by ``by``; only ``user``'s slots when given."""
        key = self._TALLY_KEYS[by]
        where, args = "s.state = 'claimed'", []
        if user is not None:
            where += " AND s.user = ?"
            args.append(user)
        rows = {}
        for r in self.db.execute(
            f"SELECT {key} AS k, sum(s.credits), count(*), "
            f"sum(CASE WHEN s.owner IS NULL THEN s.credits ELSE 0 END) "
            f"FROM credit_slots s WHERE {where} GROUP BY k", args):
            rows[r[0]] = {"key": r[0], "credits": r[1] or 0, "slots": r[2], "pending": r[3] or 0, "counters": {}}
        for k, name, total in self.db.execute(
            f"SELECT {key} AS k, c.name, sum(c.value) FROM credit_slots s "
            f"JOIN credit_counters c ON c.slot = s.slot WHERE {where} GROUP BY k, c.name", args):
            if k in rows:
                rows[k]["counters"][name] = total
        return list(rows.values())

    def credit_slots(self, *, user: Optional[str] = None, state: Optional[str] = None,
                     session_id: Optional[str] = None, machine: Optional[str] = None,
                     slots: Sequence[str] = (), limit: int = 10_000) -> list[dict[str, Any]]:
        where, args = [], []
        for col, val in (("user", user), ("state", state), ("session_id", session_id), ("machine", machine)):
            if val is not None:
                where.append(f"{col} = ?")
                args.append(val)
        if slots:
            where.append(f"slot IN ({','.join('?' * len(slots))})")
            args.extend(slots)
        sql = f"SELECT {self.SLOT_COLUMNS} FROM credit_slots"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY allocated, slot LIMIT ?"
        out = [dict(r) for r in self.db.execute(sql, [*args, limit])]
        if out:
            by_slot = {r["slot"]: r for r in out}
            for r in out:
                r["counters"], r["meta"] = {}, {}
            for table, field in (("credit_counters", "counters"), ("credit_meta", "meta")):
                for i in range(0, len(out), 500):
                    part = [r["slot"] for r in out[i:i + 500]]
                    for slot, name, value in self.db.execute(
                            f"SELECT slot, name, value FROM {table} WHERE slot IN ({','.join('?' * len(part))})", part):
                        by_slot[slot][field][name] = value
        return out

    def claimed_credits(self, task_ids: Sequence[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for i in range(0, len(task_ids), 500):
            part = list(task_ids[i:i + 500])
            out.update(self.db.execute(
                f"SELECT slot, credits FROM credit_slots WHERE state = 'claimed' "
                f"AND slot IN ({','.join('?' * len(part))})", part))
        return out

    def machine_credits(self) -> dict[str, int]:
        return dict(self.db.execute(
            "SELECT machine, sum(credits) FROM credit_slots WHERE state = 'claimed' GROUP BY machine"))


class _Tx:
    """``with store.transaction():`` — one commit for many writes.

    Nested inside another transaction it is a savepoint: an error rolls back
    only its own writes (the hub handles a batch of events in one
    transaction, each event in a savepoint of it)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.nested = False

    def __enter__(self) -> None:
        self.nested = self.db.in_transaction
        self.db.execute("SAVEPOINT tx" if self.nested else "BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.nested:
            if exc_type is not None:
                self.db.execute("ROLLBACK TO tx")
            self.db.execute("RELEASE tx")
        else:
            self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")


def _chunks(seq: Sequence[str], n: int) -> Iterator[Sequence[str]]:
    seq = list(seq)
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def read_blob_references(path: Path | str) -> set[str]:
    """The blobs the store still needs (blobgc.py says why each is kept):
    Data of unfinished tasks, artifacts of stored results, job files.

    Opens its own read-only connection, so it can run in a thread (or in
    ``hwf blobs gc``) on a snapshot while the hub keeps writing.
    """
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    db.execute("PRAGMA busy_timeout=5000")
    keep: set[str] = set()
    try:
        db.execute("BEGIN")  # one snapshot for all three reads
        terminal = ",".join(f"'{s}'" for s in ("finished", "failed", "cancelled"))
        for (spec,) in db.execute(f"SELECT spec FROM tasks WHERE status NOT IN ({terminal})"):
            for stage in loads(spec).get("stages", []):
                keep.update(d["sha256"] for d in stage.get("data", []))
        for (result,) in db.execute("SELECT result FROM tasks WHERE result IS NOT NULL"):
            keep.update(a["sha256"] for a in loads(result).get("artifacts", []) if a.get("sha256"))
        keep.update(r[0] for r in db.execute("SELECT sha256 FROM job_files"))
        db.execute("COMMIT")
    finally:
        db.close()
    return keep
