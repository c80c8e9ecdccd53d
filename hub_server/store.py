"""The hub's durable state: SQLite in WAL mode under the state directory.

Every accepted task, every state transition (with its time), every attempt,
every result and every machine is written here before the hub acts on it,
so a hub killed with SIGKILL and restarted on the same directory loses
nothing it had acknowledged.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import msgspec

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (
    hash TEXT PRIMARY KEY, role TEXT NOT NULL, label TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY, created REAL NOT NULL);
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
    result_attempt INTEGER);
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
    first_seen REAL NOT NULL, last_seen REAL NOT NULL, load BLOB, instance TEXT);
"""

TASK_COLUMNS = (
    "task_id, session_id, spec, requirements, priority, max_retries, status, submitted, "
    "queued, started, finished, machine, attempt, exit_code, error, reason, result, "
    "result_attempt, seq"
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
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a committed transaction survives a process
        # crash (SIGKILL); only an OS crash can lose the latest commits.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA busy_timeout=5000")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def transaction(self) -> "_Tx":
        return _Tx(self.db)

    # -- meta / tokens ------------------------------------------------------

    def meta(self, key: str) -> Optional[str]:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def add_token(self, token_hash: str, role: str, label: str = "") -> None:
        self.db.execute(
            "INSERT INTO tokens(hash, role, label, created) VALUES (?, ?, ?, ?)",
            (token_hash, role, label, time.time()),
        )

    def token_role(self, token_hash: str) -> Optional[str]:
        row = self.db.execute("SELECT role FROM tokens WHERE hash=?", (token_hash,)).fetchone()
        return row[0] if row else None

    def tokens(self) -> list[sqlite3.Row]:
        return self.db.execute("SELECT role, label, created FROM tokens ORDER BY created").fetchall()

    # -- tasks --------------------------------------------------------------

    def add_session(self, session_id: str, at: float) -> None:
        self.db.execute(
            "INSERT OR IGNORE INTO sessions(session_id, created) VALUES (?, ?)", (session_id, at)
        )

    def session_exists(self, session_id: str) -> bool:
        q = "SELECT 1 FROM sessions WHERE session_id=?"
        return self.db.execute(q, (session_id,)).fetchone() is not None

    def insert_tasks(self, rows: Iterable[tuple]) -> None:
        """rows: (seq, task_id, session_id, spec, requirements, priority, max_retries, at)."""
        rows = list(rows)
        self.db.executemany(
            "INSERT INTO tasks(seq, task_id, session_id, spec, requirements, priority, max_retries, "
            "status, submitted, queued) VALUES (?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?)",
            [(*r, r[-1]) for r in rows],
        )
        self.db.executemany(
            "INSERT INTO transitions(task_id, state, at) VALUES (?, 'queued', ?)",
            [(r[1], r[-1]) for r in rows],
        )

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

    def active_attempts(self) -> list[sqlite3.Row]:
        q = "SELECT * FROM attempts WHERE state IN ('assigned', 'running')"
        return self.db.execute(q).fetchall()

    def count_active(self) -> int:
        q = "SELECT count(*) FROM tasks WHERE status NOT IN ('finished', 'failed', 'cancelled')"
        return self.db.execute(q).fetchone()[0]

    # -- machines -----------------------------------------------------------

    def upsert_machine(
        self, machine_id: str, name: str, hardware: dict, slots: int, tags: list[str], at: float,
        instance: str = "",
    ) -> None:
        self.db.execute(
            "INSERT INTO machines(machine_id, name, hardware, slots, tags, state, first_seen, last_seen, instance) "
            "VALUES (?, ?, ?, ?, ?, 'online', ?, ?, ?) ON CONFLICT(machine_id) DO UPDATE SET "
            "name=excluded.name, hardware=excluded.hardware, slots=excluded.slots, "
            "tags=excluded.tags, state='online', last_seen=excluded.last_seen, instance=excluded.instance",
            (machine_id, name, dumps(hardware), slots, dumps(tags), at, at, instance),
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


class _Tx:
    """``with store.transaction():`` — one commit for many writes."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")


def _chunks(seq: Sequence[str], n: int) -> Iterator[Sequence[str]]:
    seq = list(seq)
    for i in range(0, len(seq), n):
        yield seq[i : i + n]
