"""The OpenAPI 3 document of the Manager HTTP API (served at /api/openapi.json).

Written by hand, next to httpshapes.py whose shapes it describes; the test
suite fuzzes the live API against it (schemathesis), so a route or a field
that drifts from it fails there.
"""

from __future__ import annotations

from typing import Any

from . import protocol as p

_NULL_STR = {"type": ["string", "null"]}
_NULL_INT = {"type": ["integer", "null"]}
_NULL_NUM = {"type": ["number", "null"]}

ERROR = {"type": "object", "required": ["error", "message"],
         "properties": {"error": {"type": "string"}, "message": {"type": "string"}}}

TASK = {
    "type": "object",
    "required": ["id", "worker_id", "priority", "status", "frame_start", "frame_end", "frame_current", "format"],
    "properties": {
        "id": {"type": "string"}, "worker_id": _NULL_STR, "priority": {"type": "integer"},
        "status": {"type": "string", "enum": list(p.TaskStatus.__args__)},  # type: ignore[attr-defined]
        "frame_start": _NULL_INT, "frame_end": _NULL_INT, "frame_current": _NULL_INT, "format": {"type": "string"},
        "progress": _NULL_NUM, "parser": _NULL_STR, "session_id": {"type": "string"}, "user": {"type": "string"},
        "label": {"type": "string"}, "task_id": _NULL_STR, "job_id": _NULL_STR,
        "submitted": _NULL_NUM, "started": _NULL_NUM, "finished": _NULL_NUM, "exit_code": _NULL_INT,
        "error": _NULL_STR, "reason": _NULL_STR, "wait_reason": _NULL_STR, "credits": _NULL_INT,
        "stages": {"type": "array", "items": {"type": "object"}},
        "attempts": {"type": "array", "items": {"type": "object"}},
        "artifacts": {"type": "array", "items": {"type": "object"}},
    },
}

WORKER = {
    "type": "object",
    "required": ["id", "hostname", "status", "connection", "load_average", "slots", "running"],
    "properties": {
        "id": {"type": "string"}, "hostname": {"type": "string"},
        "status": {"type": "string", "enum": ["enabled", "disabled", "drain"]},
        "connection": {"type": "string", "enum": ["online", "offline"]},
        "system": _NULL_STR, "current_task": _NULL_STR, "current_tasks": {"type": "array", "items": {"type": "string"}},
        "activity": _NULL_STR, "ip_address": _NULL_STR, "port": {"type": "null"}, "log": {"type": "null"},
        "time_cost": {"type": "null"},
        "load_average": {"type": "object", "properties": {k: {"type": "number"} for k in ("1min", "5min", "15min")}},
        "cpu_percent": {"type": "number"}, "mem_percent": {"type": "number"}, "disk_percent": {"type": "number"},
        "slots": {"type": "integer"}, "running": {"type": "integer"}, "owner": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}}, "last_seen": _NULL_NUM,
        "update_frequent": {"type": "object"}, "update_less_frequent": {"type": "object"}, "hardware": {"type": "object"},
    },
}

SESSION = {
    "type": "object", "required": ["session_id", "created", "counts", "total", "progress"],
    "properties": {"session_id": {"type": "string"}, "created": {"type": "number"}, "user": _NULL_STR,
                   "counts": {"type": "object", "additionalProperties": {"type": "integer"}},
                   "total": {"type": "integer"}, "progress": {"type": "number"},
                   "task_ids": {"type": "array", "items": {"type": "string"}}},
}

CREDIT_ROW = {"type": "object", "required": ["key", "credits", "slots", "pending"],
              "properties": {"key": _NULL_STR, "credits": {"type": "integer"}, "slots": {"type": "integer"},
                             "pending": {"type": "integer"}}}

JOB = {
    "type": "object", "required": ["type"],
    "properties": {
        "type": {"type": "string", "description": "the compiler: shell or frames"},
        "settings": {"description": "for the compiler: an object, or (form) a JSON string",
                     "oneOf": [{"type": "object"}, {"type": "string"}]},
        "priority": {"type": "integer", "minimum": -1_000_000, "maximum": 1_000_000},
        "parser": {"type": "string", "enum": list(p.PARSERS)},
        "task_id": {"type": "string", "description": "your own id for the task (e.g. brender's)"},
        "job_id": {"type": "string", "description": "your job's id: its jobfile is kept for the job's later tasks"},
        "session_id": {"type": "string"},
    },
}


def _json(schema: dict[str, Any], description: str = "") -> dict[str, Any]:
    return {"description": description or "OK", "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    names = {400: "malformed request", 401: "missing or invalid token", 403: "not allowed for this role",
             404: "unknown (or another user's)", 409: "not in a state that allows it", 413: "too large",
             415: "unsupported body type", 422: "a field is invalid (the message names it)",
             429: "queue full", 504: "the hub did not answer in time"}
    return {str(c): _json({"$ref": "#/components/schemas/Error"}, names[c]) for c in codes}


def _params(*names: tuple[str, str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"name": n, "in": where, "required": where == "path", "schema": schema} for n, where, schema in names]


_ID = ("id", "path", {"type": "string"})
_BODY_FORMS = ("application/json", "application/x-www-form-urlencoded")


def _body(schema: dict[str, Any], *, multipart: bool = False) -> dict[str, Any]:
    content = {t: {"schema": schema} for t in _BODY_FORMS}
    if multipart:
        props = dict(schema.get("properties", {}))
        props["jobfile"] = {"type": "string", "format": "binary"}
        content["multipart/form-data"] = {"schema": {**schema, "properties": props}}
    return {"required": True, "content": content}


def openapi_document(limits: p.Limits) -> dict[str, Any]:
    """The API as OpenAPI 3.1 (JSON Schema types, so fields may be null)."""
    auth_errors = (401, 403)
    patch_task = {"type": "object", "minProperties": 1, "additionalProperties": False,
                  "properties": {"priority": {"type": "integer", "minimum": -1_000_000, "maximum": 1_000_000},
                                 "status": {"type": "string", "enum": ["cancelled"]}}}
    patch_worker = {"type": "object", "required": ["status"], "additionalProperties": False,
                    "properties": {"status": {"type": "string", "enum": ["enabled", "disabled", "drain"]}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "HWF hub: Manager API", "version": "1",
                 "description": "The render-farm Manager API over HWF's hub: same tokens, users and tasks as "
                                f"the websocket. Bodies up to {limits.max_file_bytes} bytes of jobfile."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": ERROR, "Task": TASK, "Worker": WORKER, "Session": SESSION, "Job": JOB,
                        "CreditRow": CREDIT_ROW},
        },
        "security": [{"bearer": []}],
        "paths": {
            "/api/whoami": {"get": {"summary": "who the token speaks for", "responses": {
                "200": _json({"type": "object", "required": ["user", "role"],
                              "properties": {"user": {"type": "string"}, "role": {"type": "string"}}}),
                **_errors(*auth_errors)}}},
            "/api/snapshot": {"get": {"summary": "what the status page shows", "responses": {
                "200": _json({"type": "object", "required": ["time", "user", "role", "sessions", "tasks", "workers"],
                              "properties": {"sessions": {"type": "array", "items": {"$ref": "#/components/schemas/Session"}},
                                             "tasks": {"type": "array", "items": {"$ref": "#/components/schemas/Task"}},
                                             "workers": {"type": "object", "additionalProperties": {"$ref": "#/components/schemas/Worker"}},
                                             "credits": {"type": ["array", "null"], "items": {"$ref": "#/components/schemas/CreditRow"}}}}),
                **_errors(*auth_errors)}}},
            "/tasks": {
                "post": {"summary": "create a job's task(s) with a compiler (202)", "requestBody": _body(JOB, multipart=True),
                         "responses": {"202": _json({"oneOf": [
                             {"$ref": "#/components/schemas/Task"},
                             {"type": "object", "required": ["tasks"], "properties": {
                                 "job_id": _NULL_STR, "session_id": {"type": "string"},
                                 "tasks": {"type": "array", "items": {"$ref": "#/components/schemas/Task"}}}}]}),
                             **_errors(400, *auth_errors, 404, 413, 415, 422, 429)}},
                "get": {"summary": "tasks by filter, newest first", "parameters": _params(
                    ("status", "query", {"type": "string"}), ("session", "query", {"type": "string"}),
                    ("user", "query", {"type": "string"}), ("worker", "query", {"type": "string"}),
                    ("job_id", "query", {"type": "string"}), ("task_id", "query", {"type": "string"}),
                    ("hidden", "query", {"type": "string", "enum": ["true", "false"]}),
                    ("offset", "query", {"type": "integer", "minimum": 0}),
                    ("limit", "query", {"type": "integer", "minimum": 1, "maximum": 1000})),
                    "responses": {"200": _json({"type": "object", "required": ["tasks", "total", "offset", "limit"],
                                                "properties": {"tasks": {"type": "array", "items": {"$ref": "#/components/schemas/Task"}},
                                                               "total": {"type": "integer"}, "offset": {"type": "integer"},
                                                               "limit": {"type": "integer"}}}),
                                  **_errors(*auth_errors, 422)}},
            },
            "/tasks/file/{job_id}": {"get": {"summary": "is this job's file already here?",
                                             "parameters": _params(("job_id", "path", {"type": "string"})),
                                             "responses": {"200": _json({"type": "object", "required": ["file"],
                                                                         "properties": {"file": {"type": "boolean"}}}),
                                                           **_errors(*auth_errors, 422)}}},
            "/tasks/{id}": {
                "get": {"summary": "one task (by HWF id or your task_id), with stages and timings",
                        "parameters": _params(_ID),
                        "responses": {"200": _json({"$ref": "#/components/schemas/Task"}), **_errors(*auth_errors, 404)}},
                "patch": {"summary": "priority while queued; status cancelled (204)", "parameters": _params(_ID),
                          "requestBody": _body(patch_task),
                          "responses": {"204": {"description": "changed"}, **_errors(400, *auth_errors, 404, 409, 415, 422)}},
                "delete": {"summary": "cancel and hide (202)", "parameters": _params(_ID),
                           "responses": {"202": _json({"$ref": "#/components/schemas/Task"}), **_errors(*auth_errors, 404)}},
            },
            "/workers": {
                "get": {"summary": "workers keyed by id", "responses": {
                    "200": _json({"type": "object", "additionalProperties": {"$ref": "#/components/schemas/Worker"}}),
                    **_errors(*auth_errors)}},
                "post": {"summary": "how daemons register (they use the websocket): always 400",
                         "responses": _errors(400, *auth_errors)},
            },
            "/workers/{id}": {
                "get": {"summary": "one worker with live load", "parameters": _params(_ID),
                        "responses": {"200": _json({"$ref": "#/components/schemas/Worker"}), **_errors(*auth_errors, 404)}},
                "patch": {"summary": "admin: enabled, disabled or drain (204)", "parameters": _params(_ID),
                          "requestBody": _body(patch_worker),
                          "responses": {"204": {"description": "changed"}, **_errors(400, *auth_errors, 404, 415, 422)}},
            },
            "/sessions": {"get": {"summary": "your sessions (an admin: everyone's), newest first", "responses": {
                "200": _json({"type": "object", "required": ["sessions"],
                              "properties": {"sessions": {"type": "array", "items": {"$ref": "#/components/schemas/Session"}}}}),
                **_errors(*auth_errors)}}},
            "/sessions/{id}": {"get": {"summary": "one session's tasks and counts", "parameters": _params(_ID),
                                       "responses": {"200": _json({"$ref": "#/components/schemas/Session"}),
                                                     **_errors(*auth_errors, 404)}}},
            "/credits": {"get": {"summary": "credit tally", "parameters": _params(
                ("by", "query", {"type": "string", "enum": list(p.CreditGroup.__args__)})),  # type: ignore[attr-defined]
                "responses": {"200": _json({"type": "object", "required": ["by", "rows"],
                                            "properties": {"by": {"type": "string"},
                                                           "rows": {"type": "array", "items": {"$ref": "#/components/schemas/CreditRow"}}}}),
                              **_errors(*auth_errors, 422)}}},
        },
    }
