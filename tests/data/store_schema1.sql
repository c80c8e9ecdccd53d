-- The hub store of HWF 0.1 (schema 1: no users, owners or blob access), kept to test migration.
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
