"""The Manager HTTP API's shapes: request fields checked, replies in the seed's form.

No I/O: http_api.py reads bodies and speaks to the core; this module says
what a field must be (an ``HttpError`` naming it otherwise) and what the
seed's JSON looks like for a task, a worker, a session.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import msgspec

from . import protocol as p

JOBFILE_NAME = "hwf-jobfile.zip"
UNPACK_STAGE = "unpack-jobfile"
MAX_PAGE = 1000


class HttpError(Exception):
    """An answer other than success: ``status``, a code and a message naming the problem."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def field_error(name: str, problem: str) -> HttpError:
    return HttpError(422, "bad_field", f"{name}: {problem}")


# -------------------------------------------------------------- requests


@dataclass(frozen=True)
class JobRequest:
    """A ``POST /tasks`` body: the seed's fields (plus HWF's ``session_id``)."""

    type: str
    settings: dict[str, Any]
    priority: int = 0
    parser: Optional[str] = None
    job_id: Optional[str] = None
    external_id: Optional[str] = None  # the seed's ``task_id``: the caller's own id for the task
    session_id: Optional[str] = None


def _int(value: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool):
        raise field_error(name, f"must be a whole number, got {value!r}")
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise field_error(name, f"must be a whole number, got {value[:40]!r}") from None
    if not isinstance(value, int):
        raise field_error(name, f"must be a whole number, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise field_error(name, f"must be from {lo} to {hi}, got {value}")
    return value


def external_id(value: Any, name: str) -> str:
    """The caller's id for a job or task (brender sends integers; forms send strings)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise field_error(name, f"must be a string or a whole number, got {type(value).__name__}")
    try:
        return msgspec.convert(value.strip(), p.ExternalId)
    except msgspec.ValidationError:
        raise field_error(name, "must be 1-128 letters, digits or . _ : @ - (starting with a letter or digit)") from None


def job_request(form: Mapping[str, Any]) -> JobRequest:
    known = {"type", "settings", "priority", "parser", "task_id", "job_id", "session_id"}
    unknown = sorted(set(form) - known)
    if unknown:
        raise field_error(unknown[0], f"unknown field (known: {', '.join(sorted(known))})")
    kind = form.get("type")
    if not isinstance(kind, str) or not kind.strip():
        raise field_error("type", "required: the compiler to use (shell or frames)")
    settings = form.get("settings", {})
    if isinstance(settings, str):  # a form field: the seed sends settings as a JSON string
        try:
            settings = json.loads(settings) if settings.strip() else {}
        except json.JSONDecodeError as exc:
            raise field_error("settings", f"not valid JSON: {exc}") from None
    if not isinstance(settings, dict):
        raise field_error("settings", f"must be a JSON object, got {type(settings).__name__}")
    parser = form.get("parser")
    if parser in ("", None):
        parser = None
    elif parser not in p.PARSERS:
        raise field_error("parser", f"unknown parser {str(parser)[:40]!r} (known: {', '.join(p.PARSERS)})")
    session = form.get("session_id")
    if session is not None:
        if not isinstance(session, str) or not session.startswith("s-") or len(session) > 128:
            raise field_error("session_id", "must be a session id like 's-…'")
    return JobRequest(
        type=kind.strip(), settings=settings,
        priority=_int(form.get("priority", 0), "priority", -1_000_000, 1_000_000),
        parser=parser,
        job_id=external_id(form["job_id"], "job_id") if form.get("job_id") not in (None, "") else None,
        external_id=external_id(form["task_id"], "task_id") if form.get("task_id") not in (None, "") else None,
        session_id=session,
    )


def with_jobfile(spec: p.TaskSpec, jobfile: p.DataSpec) -> p.TaskSpec:
    """The task with the job's zip as Data of a first stage that unpacks it
    into the task's dir (Python's zipfile drops absolute and ``..`` parts)."""
    unpack = p.StageSpec(name=UNPACK_STAGE, cmds=[f"python3 -m zipfile -e {JOBFILE_NAME} . && rm -f {JOBFILE_NAME}"],
                         data=[jobfile], comment="the job's files (its jobfile zip)")
    return msgspec.structs.replace(spec, stages=[unpack, *spec.stages])


def task_query(query: Mapping[str, str]) -> dict[str, Any]:
    """``GET /tasks`` filters as ``ListTasks`` fields."""
    known = {"status", "session", "user", "worker", "job_id", "task_id", "offset", "limit", "hidden"}
    unknown = sorted(set(query) - known)
    if unknown:
        raise field_error(unknown[0], f"unknown filter (known: {', '.join(sorted(known))})")
    out: dict[str, Any] = {"offset": _int(query.get("offset", "0"), "offset", 0, 10**9),
                           "limit": _int(query.get("limit", "100"), "limit", 1, MAX_PAGE)}
    if "status" in query:
        wanted = [s.strip() for s in query["status"].split(",") if s.strip()]
        statuses = p.TaskStatus.__args__  # type: ignore[attr-defined]
        bad = [s for s in wanted if s not in statuses]
        if bad:
            raise field_error("status", f"unknown status {bad[0][:40]!r} (known: {', '.join(statuses)})")
        out["status"] = wanted
    for name, field, kind in (("session", "session_id", p.Id), ("user", "user", p.Name),
                              ("worker", "machine", p.Name)):
        if name in query:
            try:
                out[field] = msgspec.convert(query[name], kind)
            except msgspec.ValidationError as exc:
                raise field_error(name, str(exc)) from None
    if "job_id" in query:
        out["job_id"] = external_id(query["job_id"], "job_id")
    if "task_id" in query:
        out["external_id"] = external_id(query["task_id"], "task_id")
    if "hidden" in query:
        if query["hidden"] not in ("true", "false", "1", "0"):
            raise field_error("hidden", "must be true or false")
        out["include_hidden"] = query["hidden"] in ("true", "1")
    return out


def task_patch(form: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(form) - {"priority", "status"})
    if unknown:
        raise field_error(unknown[0], "unknown field (a task's priority and status can change)")
    if not form:
        raise field_error("priority", "give priority (while queued) or status 'cancelled'")
    out: dict[str, Any] = {}
    if "priority" in form:
        out["priority"] = _int(form["priority"], "priority", -1_000_000, 1_000_000)
    if "status" in form:
        if form["status"] != "cancelled":
            raise field_error("status", f"only 'cancelled' can be set, got {str(form['status'])[:40]!r}")
        out["status"] = "cancelled"
    return out


def worker_patch(form: Mapping[str, Any]) -> str:
    unknown = sorted(set(form) - {"status"})
    if unknown:
        raise field_error(unknown[0], "unknown field (a worker's status can change)")
    status = form.get("status")
    if status not in ("enabled", "disabled", "drain"):
        raise field_error("status", f"must be enabled, disabled or drain, got {str(status)[:40]!r}")
    return status  # type: ignore[return-value]


def credit_group(by: str) -> str:
    groups = p.CreditGroup.__args__  # type: ignore[attr-defined]
    if by not in groups:
        raise field_error("by", f"must be one of {', '.join(groups)}, got {by[:40]!r}")
    return by


# ---------------------------------------------------------------- replies


def task(rec: p.TaskRecord, *, full: bool = False) -> dict[str, Any]:
    """The seed's task fields (``id``, ``worker_id``, ``priority``, ``status``,
    ``frame_*``, ``format``) and HWF's."""
    out: dict[str, Any] = {
        "id": rec.task_id, "worker_id": rec.machine, "priority": rec.priority, "status": rec.status,
        "frame_start": rec.frame_start, "frame_end": rec.frame_end, "frame_current": rec.frame_current,
        "format": "", "progress": rec.progress, "parser": rec.parser,
        "session_id": rec.session_id, "user": rec.user, "label": rec.label,
        "task_id": rec.external_id, "job_id": rec.job_id,
        "submitted": rec.submitted, "started": rec.started, "finished": rec.finished,
        "exit_code": rec.exit_code, "error": rec.error, "reason": rec.reason, "wait_reason": rec.wait_reason,
        "credits": rec.credits,
    }
    if full:
        out["stages"] = [
            {"name": st.name, "status": st.status, "started": st.started, "duration": st.duration,
             "cpu_time": st.cpu_time, "peak_ram": st.peak_ram, "note": st.note,
             "commands": [{"cmd": c.cmd, "exit_code": c.exit_code, "duration": c.duration,
                           "stdout_tail": c.stdout[-2000:], "stderr_tail": c.stderr[-2000:]} for c in st.commands]}
            for st in rec.stages
        ]
        out["attempts"] = [{"attempt": a.attempt, "worker_id": a.machine, "state": a.state, "assigned": a.assigned,
                            "started": a.started, "ended": a.ended, "reason": a.reason} for a in rec.attempts]
        out["artifacts"] = [{"name": a.name, "pattern": a.pattern, "sha256": a.sha256, "size": a.size,
                             "error": a.error} for a in rec.artifacts]
    return out


def worker(m: p.MachineInfo, *, full: bool = False) -> dict[str, Any]:
    """A worker as the seed's ``GET /workers`` lists it, with live load."""
    hw = m.hardware or {}
    status = "drain" if m.state == "draining" and not m.enabled else ("enabled" if m.enabled else "disabled")
    load = m.load or p.Load()
    system = " ".join(str(x) for x in (hw.get("os"), hw.get("arch")) if x)
    out: dict[str, Any] = {
        "id": m.machine_id, "hostname": m.name, "status": status,
        "connection": "offline" if m.state == "offline" else "online",
        "system": system or None, "current_task": m.current_tasks[0] if m.current_tasks else None,
        "current_tasks": m.current_tasks, "activity": f"running {m.running} of {m.slots}" if m.state != "offline" else None,
        "ip_address": m.ip_address, "port": None, "log": None, "time_cost": None,
        "load_average": {"1min": load.load_avg[0], "5min": load.load_avg[1], "15min": load.load_avg[2]},
        "cpu_percent": load.cpu_percent, "mem_percent": load.mem_percent, "disk_percent": load.disk_percent,
        "slots": m.slots, "running": m.running, "owner": m.owner, "tags": m.tags, "last_seen": m.last_seen,
    }
    if full:
        out["update_frequent"] = {"load_average": out["load_average"], "worker_cpu_percent": load.cpu_percent}
        out["update_less_frequent"] = {"worker_architecture": hw.get("arch"), "worker_disk_percent": load.disk_percent,
                                       "worker_mem_percent": load.mem_percent, "worker_num_cpus": hw.get("cores")}
        out["hardware"] = hw
    return out


def session(row: Mapping[str, Any], task_ids: Optional[list[str]] = None) -> dict[str, Any]:
    counts = dict(row["counts"])
    total = sum(counts.values())
    ended = sum(n for s, n in counts.items() if s in p.TERMINAL_STATES)
    out = {"session_id": row["session_id"], "created": row["created"], "user": row.get("user"),
           "counts": counts, "total": total, "progress": round(100.0 * ended / total, 1) if total else 0.0}
    if task_ids is not None:
        out["task_ids"] = task_ids
    return out


def credit_row(r: p.CreditTallyRow) -> dict[str, Any]:
    return {"key": r.key, "credits": r.credits, "slots": r.slots, "pending": r.pending}
