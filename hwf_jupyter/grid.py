"""``GridConnector``: the HTC-Grid client API (seed 001) as a facade over HWF.

Seed code written against ``api.connector.AWSConnector`` keeps its calls and
dict shapes, and a seed client config works as it is: HTC-Grid deploys its
lambda with the compute plane, so here the farm names the handler (``hwf
daemon --grid-handler`` or ``hwf hub --grid-handler``: ``module:function``
or a shell command) and each task dict becomes an HWF task whose one stage
calls it (``hub_server/gridcall.py``).  A config's ``command`` (a shell
command reading the dict as JSON on stdin) or ``handler``
(``module:function`` importable on the daemons) overrides the farm's.
Nothing here talks to the hub except through ``Hub``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import weakref
from pathlib import Path
from typing import Any, Optional

from hub_server import gridcall
from hub_server import hardware as hw
from hub_server import protocol as p
from hub_server.link import ConnectError

from ._ioloop import io_loop

from .dispatch import dispatch_sync
from .hub import Hub
from .task import Data, Stage, Task

_TRUE = {"1", "true", "yes", "on"}


class GridError(ValueError):
    """Bad configuration, bad input, or a call made in the wrong order."""


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


class GridConnector:
    """HTC-Grid's ``AWSConnector``, run on an HWF hub.

    ``client_config_data`` keys:

    * ``hub_url`` (required; ``public_api_gateway_url`` is an alias): the hub,
      as ``host``, ``host:port`` or ``ws://host:port``.
    * ``token`` (optional): a client token; otherwise ``HWF_TOKEN`` is used.
    * ``intra_vpc`` (bool; or env ``INTRA_VPC=1``): connect without a token.
      The hub must run with ``--trust-loopback`` and this connector must be on
      the same machine.  ``HWF_TOKEN`` is then not read; an explicit
      ``token`` is still sent if given.
    * ``command`` (optional): a shell command run on a daemon for each task.
      It receives the task's dict as JSON on stdin (the seed's lambda event);
      its stdout is the task's output.
    * ``handler`` (optional): ``"module:function"`` importable on the daemons,
      called with the task's dict (and a lambda context if it takes two
      arguments) by their Python workers; its return value (a string, else
      JSON) is the task's output, its prints are the task's stderr.
    * Neither: the farm's handler (``hwf daemon --grid-handler`` or the hub's).
    * ``hardware`` (optional dict): HWF hardware requirements of every task.
    * ``max_retries`` (default 3): re-runs after a lost daemon.
    * ``task_timeout_sec`` (optional): per-task time limit in seconds.
    * ``stage_name`` (default ``"lambda"``): the HWF stage name.

    The seed's other keys (``grid_storage_service``, ``s3_bucket``,
    ``redis_url``, ``api_gateway_key``, ``user_pool_id``,
    ``cognito_userpool_client_id``, ``username``, ``password``,
    ``dynamodb_results_pull_interval_sec``, ``region``, ...) are accepted and
    ignored: HWF has no separate data plane and no polling interval (waiting
    is event-driven), and it authenticates with a token, not Cognito.

    Differences from the seed: ``failed_OUTPUT`` / ``cancelled_OUTPUT`` hold
    the real error text instead of ``'read_from_REDIS'``; ``finished_OUTPUT``
    is the command's stdout (capped by the hub's ``max_output_bytes``); and
    ``cancel_sessions`` really kills processing tasks on their daemons.
    """

    def __init__(self, client_config_data: dict) -> None:
        if not isinstance(client_config_data, dict):
            raise GridError(f"client_config_data must be a dict, got {type(client_config_data).__name__}")
        cfg = client_config_data
        url = cfg.get("hub_url") or cfg.get("public_api_gateway_url")
        if not isinstance(url, str) or not url.strip():
            raise GridError("client_config_data needs 'hub_url' (or 'public_api_gateway_url'): the hub's address")
        command = cfg.get("command")
        if command is not None and (not isinstance(command, str) or not command.strip()):
            raise GridError("'command' must be a shell command that reads a task's JSON on stdin")
        handler = cfg.get("handler")
        if handler is not None and (not isinstance(handler, str) or not gridcall.is_module_ref(handler.strip())):
            raise GridError(f"'handler' must be 'module:function', got {handler!r}")
        if command is not None and handler is not None:
            raise GridError("give 'command' or 'handler', not both")
        token = cfg.get("token")
        if token is not None and not isinstance(token, str):
            raise GridError("'token' must be a string")
        hardware = cfg.get("hardware") or {}
        if not isinstance(hardware, dict):
            raise GridError(f"'hardware' must be a dict, got {hardware!r}")
        try:
            hw.normalize(hardware)
        except hw.HardwareError as exc:
            raise GridError(f"'hardware': {exc}") from None
        max_retries = cfg.get("max_retries", 3)
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise GridError(f"'max_retries' must be a whole number >= 0, got {max_retries!r}")
        timeout = cfg.get("task_timeout_sec")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not timeout > 0):
            raise GridError(f"'task_timeout_sec' must be a number of seconds > 0, got {timeout!r}")
        stage_name = cfg.get("stage_name", "lambda")
        if not isinstance(stage_name, str) or not stage_name.strip():
            raise GridError(f"'stage_name' must be a non-empty string, got {stage_name!r}")

        self.hub_url = url.strip()
        self.command: Optional[str] = command
        self.handler: Optional[str] = handler.strip() if handler is not None else None
        self.intra_vpc = bool(cfg.get("intra_vpc", False)) or _env_flag("INTRA_VPC")
        self.hardware: dict[str, Any] = dict(hardware)
        self.max_retries = max_retries
        self.task_timeout_sec: Optional[float] = timeout
        self.stage_name = stage_name
        self._config_token: Optional[str] = token
        self.hub: Optional[Hub] = None
        # Event files live here only until their upload; removed on close/GC.
        self._tmpdir = tempfile.mkdtemp(prefix="hwf-grid-")
        self._finalizer = weakref.finalize(self, shutil.rmtree, self._tmpdir, True)

    # -- connection ----------------------------------------------------------

    def authenticate(self) -> None:
        """Resolve the token and connect now, so bad credentials fail here."""
        if self.intra_vpc:
            token = self._config_token or ""  # "" keeps Hub from reading HWF_TOKEN
        else:
            token = self._config_token or os.environ.get("HWF_TOKEN") or ""
            if not token:
                raise GridError(
                    "no token: set 'token' in client_config_data or the HWF_TOKEN environment variable, "
                    "or use 'intra_vpc': True (or INTRA_VPC=1) against a hub run with --trust-loopback"
                )
        hub = Hub(self.hub_url, token=token)
        try:
            hub.connect_sync()
        except ConnectError as exc:
            hub.close_sync()
            if self.intra_vpc and not token:
                raise ConnectError(
                    f"{exc} (intra_vpc connects without a token: the hub must run with --trust-loopback "
                    "and this connector must be on the hub's machine)"
                ) from exc
            raise
        if self.hub is not None:
            self.hub.close_sync()
        self.hub = hub

    def _connected_hub(self) -> Hub:
        if self.hub is None:
            raise GridError("not authenticated: call authenticate() before send/get_results/cancel_sessions")
        return self.hub

    def close(self) -> None:
        """Drop the hub connection and the temp dir (tasks keep running)."""
        if self.hub is not None:
            self.hub.close_sync()
            self.hub = None
        self._finalizer()

    def __enter__(self) -> "GridConnector":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "authenticated" if self.hub is not None else "not authenticated"
        return f"<GridConnector {self.hub_url} ({state})>"

    # -- the seed's API --------------------------------------------------------

    def send(self, tasks_list: list[dict]) -> dict:
        """Queue one task per dict, all in one new session.

        Returns ``{'session_id': str, 'task_ids': [str, ...]}`` with ids in
        the order of ``tasks_list``.
        """
        hub = self._connected_hub()
        if not isinstance(tasks_list, (list, tuple)):
            raise GridError(f"tasks_list must be a list of dicts, got {type(tasks_list).__name__}")
        if not tasks_list:
            raise GridError("tasks_list is empty: nothing to send")
        events: list[bytes] = []
        for i, event in enumerate(tasks_list):
            if not isinstance(event, dict):
                raise GridError(f"tasks_list[{i}] must be a dict, got {type(event).__name__}")
            try:
                events.append(json.dumps(event).encode("utf-8"))
            except (TypeError, ValueError) as exc:
                raise GridError(f"tasks_list[{i}] is not JSON-serialisable: {exc}") from None
        if self.command is None:
            session_id, ids = io_loop().run_sync(hub._submit([self._call_spec(body) for body in events], None))
            return {"session_id": session_id, "task_ids": ids}
        batch = Path(tempfile.mkdtemp(dir=self._tmpdir, prefix="send-"))
        try:
            tasks = []
            for i, body in enumerate(events):
                path = batch / f"event-{i}.json"
                path.write_bytes(body)
                stage = Stage(self.stage_name, data=Data(path, "event.json"), cmd=f"{self.command} < event.json")
                tasks.append(Task(stage, hardware=self.hardware))
            sub = dispatch_sync(tasks, hub, max_retries=self.max_retries, timeout=self.task_timeout_sec)
        finally:
            shutil.rmtree(batch, ignore_errors=True)  # uploaded (or failed): no longer needed
        return {"session_id": sub.session_id, "task_ids": list(sub)}

    def _call_spec(self, event_json: bytes) -> p.TaskSpec:
        """One task calling the grid handler (the config's, else the farm's) with the event."""
        ref = gridcall.GRID_REF if self.handler is None else f"{gridcall.GRID_REF}:{self.handler}"
        hardware = hw.normalize(self.hardware)
        if self.handler is not None:  # run by any daemon's Python workers
            hardware = hw.normalize({**hardware, "runtime": ",".join(filter(None, [hardware.get("runtime"), "python"]))})
        call = p.PyCall(python="%d.%d" % sys.version_info[:2], ref=ref, arg=event_json.decode("utf-8"))
        return p.TaskSpec(stages=[p.StageSpec(name=self.stage_name, cmds=[], call=call)], hardware=hardware,
                          max_retries=self.max_retries, timeout=self.task_timeout_sec)

    def get_results(self, submission_response: dict, timeout_sec: Optional[float] = 0) -> dict:
        """Tasks that have ended, waiting up to ``timeout_sec`` for all of them.

        ``timeout_sec=0`` does not wait; ``None`` waits until every task ends.
        Waiting is event-driven (the hub answers when the last task ends), not
        polling.
        """
        hub = self._connected_hub()
        task_ids = _check_submission(submission_response)
        if timeout_sec is not None and (isinstance(timeout_sec, bool) or not isinstance(timeout_sec, (int, float))
                                        or math.isnan(timeout_sec) or timeout_sec < 0):
            raise GridError(f"timeout_sec must be a number >= 0 or None, got {timeout_sec!r}")
        # Hub.get_result keeps one deadline across its request chunks and reconnects.
        wait = timeout_sec != 0
        results = hub.get_result_sync(task_ids, wait=wait, timeout=timeout_sec if wait else None, download=False)
        by_id = {r.task_id: r for r in results}
        out: dict[str, Any] = {}
        for state in ("finished", "failed", "cancelled"):
            ids = [tid for tid in dict.fromkeys(task_ids) if tid in by_id and by_id[tid].status == state]
            if not ids:
                continue
            out[state] = ids
            if state == "finished":
                out["finished_OUTPUT"] = [by_id[tid].output for tid in ids]
            else:
                out[f"{state}_OUTPUT"] = [_error_text(by_id[tid]) for tid in ids]
        out["metadata"] = {"tasks_in_response": sum(len(out.get(s, [])) for s in ("finished", "failed", "cancelled"))}
        return out

    def cancel_sessions(self, session_ids: list[str]) -> dict:
        """Cancel every unfinished task of each session.

        Returns ``{session_id: {'cancelled_pending', 'cancelled_processing',
        'cancelled_retrying', 'total_cancelled_tasks'}}`` for every id passed.
        Unlike the seed, processing tasks are killed on their daemon (SIGTERM,
        then SIGKILL), not left to run on.
        """
        hub = self._connected_hub()
        if isinstance(session_ids, str) or not isinstance(session_ids, (list, tuple)):
            raise GridError(f"session_ids must be a list of session id strings, got {session_ids!r}")
        for sid in session_ids:
            if not isinstance(sid, str) or not sid:
                raise GridError(f"session ids are non-empty strings, got {sid!r}")
        out: dict[str, dict[str, int]] = {}
        for sid in session_ids:
            by_state = hub.cancel_sync(session=sid)["by_state"]
            pending = by_state.get("queued", 0) + by_state.get("assigned", 0)
            processing = by_state.get("running", 0)
            retrying = by_state.get("retrying", 0)
            counts = {
                "cancelled_retrying": retrying,
                "cancelled_pending": pending,
                "cancelled_processing": processing,
                "total_cancelled_tasks": pending + processing + retrying,
            }
            if sid in out:  # listed twice: the second call found nothing left
                counts = {k: out[sid][k] + counts[k] for k in counts}
            out[sid] = counts
        return out


def _check_submission(submission_response: Any) -> list[str]:
    if not isinstance(submission_response, dict):
        raise GridError(f"submission_response must be the dict send() returned, got {submission_response!r}")
    missing = [k for k in ("session_id", "task_ids") if k not in submission_response]
    if missing:
        raise GridError(f"submission_response lacks {', '.join(repr(k) for k in missing)}: pass what send() returned")
    task_ids = submission_response["task_ids"]
    if not isinstance(task_ids, (list, tuple)) or not all(isinstance(t, str) for t in task_ids):
        raise GridError("submission_response['task_ids'] must be a list of task id strings")
    return list(task_ids)


def _error_text(result: Any) -> str:
    return result.error or result.reason or result.status


AWSConnector = GridConnector

__all__ = ["AWSConnector", "GridConnector", "GridError"]
