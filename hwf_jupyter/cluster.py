"""``LocalCluster``: the embedded default — a hub and N daemons on 127.0.0.1.

The hub and daemons are real separate processes (``python -m hub_server``
and ``python -m hwf_daemon``: the ``hwf hub`` / ``hwf daemon`` a user would
run, without the notebook library), started with the caller's PID so they
stop by themselves if the Python process dies without cleaning up (kill -9,
a crashed kernel).  ``close()`` stops them by PID: SIGTERM, then SIGKILL.

``persistent=True`` (what ``%hwf_local`` uses) is the other way round: the
processes run in their own sessions, outlive the kernel, and are recorded in
a fixed per-user state dir (see ``localfarm``) so the next
``LocalCluster(persistent=True)`` attaches to them; ``close()`` only detaches
and ``stop()`` ends them.

Daemons get their token on a pipe (``--token-file -``), never in argv or
the environment, where every local user and every task could read it.
Not carrying the notebook library keeps them small: a daemon that runs
tasks as its own user forks itself per command, at a cost that grows with
its memory.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path
from typing import Optional

from hub_server import auth

from . import localfarm
from .hub import Hub


class ClusterError(RuntimeError):
    pass


def _stop_processes(procs: list[subprocess.Popen], grace: float = 5.0) -> None:
    localfarm.stop_processes(procs, grace)


def _cleanup(procs: list[subprocess.Popen], tmpdir: Optional[str]) -> None:
    _stop_processes(procs)
    if tmpdir:
        shutil.rmtree(tmpdir, ignore_errors=True)


class LocalCluster:
    """A hub (SQLite state in a temporary dir) plus ``daemons`` daemon processes."""

    def __init__(
        self,
        daemons: Optional[int] = 2,
        *,
        slots: Optional[int] = 2,
        state_dir: Optional[str | os.PathLike] = None,
        port: int = 0,
        tags: Optional[list[str]] = None,
        heartbeat_timeout: float = 10.0,
        reconnect_grace: float = 15.0,
        max_file_bytes: Optional[int] = None,
        start_timeout: float = 60.0,
        log_dir: Optional[str | os.PathLike] = None,
        trust_loopback: bool = False,
        hub_args: Optional[list[str]] = None,
        tls: Optional[tuple[str | os.PathLike, str | os.PathLike, str | os.PathLike]] = None,
        daemon_args: Optional[list[str]] = None,
        http_port: Optional[int] = 0,
        persistent: bool = False,
    ) -> None:
        """``tls=(cert, key, ca_file)`` serves wss:// with that certificate; the
        daemons and ``hub()`` trust ``ca_file``.  ``hub_args`` / ``daemon_args``:
        more ``hwf hub`` / ``hwf daemon`` options (e.g. ``--grid-handler``).

        ``persistent=True``: find the farm recorded in ``state_dir`` (default
        ``$HWF_LOCAL_DIR`` or ``~/.hwf/local``) and attach to it, or start one
        there that outlives this process; ``daemons``/``slots`` None = what
        the running farm has (2 and 2 when starting one); a running farm of
        another shape raises ClusterError saying how to change it."""
        if not persistent and (daemons is None or slots is None):
            raise ValueError("daemons and slots may be None only with persistent=True")
        if daemons is not None and daemons < 0:
            raise ValueError("daemons must be >= 0")
        if slots is not None and slots < 1:
            raise ValueError("slots must be >= 1")
        self.persistent = persistent
        #: True when this object attached to a farm another kernel started.
        self.attached = False
        if persistent:
            self._tmpdir = None
            self.root = localfarm.prepare_root(Path(state_dir) if state_dir else localfarm.default_root())
        else:
            self._tmpdir = None if state_dir else tempfile.mkdtemp(prefix="hwf-local-")
            self.root = Path(state_dir or self._tmpdir)  # type: ignore[arg-type]
        self.state_dir = self.root / "hub"
        self.log_dir = Path(log_dir) if log_dir else self.root / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.slots = slots
        self.tags = list(tags or [])
        self.daemon_args = list(daemon_args or [])
        self.start_timeout = start_timeout
        self._hub_args = [
            "--heartbeat-timeout", str(heartbeat_timeout),
            "--reconnect-grace", str(reconnect_grace),
        ]
        if max_file_bytes is not None:
            self._hub_args += ["--max-file-bytes", str(max_file_bytes)]
        if trust_loopback:
            self._hub_args.append("--trust-loopback")
        self._hub_args += list(hub_args or [])
        self.ca_file: Optional[str] = None
        if tls is not None:
            cert, key, ca = (os.fspath(x) for x in tls)
            self._hub_args += ["--tls-cert", cert, "--tls-key", key]
            self.ca_file = ca
        self.user = auth.default_user()
        store = auth.open_state_dir(self.state_dir)
        store.close()
        if persistent:  # kept in files, so a later kernel uses the same tokens
            self.token = self._saved_token(localfarm.CLIENT_TOKEN_FILE, "client", "local farm client")
            self.daemon_token = self._saved_token(localfarm.DAEMON_TOKEN_FILE, "daemon", "local farm daemons")
        else:
            #: A client token of the local user (``getpass.getuser()``).
            self.token = self.create_token("client", self.user, label="LocalCluster client")
            self.daemon_token = self.create_token("daemon", self.user, label="LocalCluster daemons")
        self.admin_token = auth.read_admin_token(self.state_dir)
        self.hub_process: Optional[subprocess.Popen] = None
        self.daemon_processes: dict[str, subprocess.Popen] = {}
        self.daemon_slots: dict[str, int] = {}  # slots each daemon was started with
        # Pools fetched by this cluster's Hubs, for the HTML card (which never waits on the hub).
        self._hubs: "weakref.WeakSet[Hub]" = weakref.WeakSet()
        self._pool_cache = None
        self._procs: list[subprocess.Popen] = []
        # A persistent farm is not ours to stop when this process exits.
        self._finalizer = weakref.finalize(self, _cleanup, [] if persistent else self._procs, self._tmpdir)
        if not persistent:
            atexit.register(self._finalizer)
        self.port = port
        self.address = ""
        # The hub's Manager HTTP API and status page: 0 = a free port, None = off.
        self.http_port = http_port
        self.http_url: Optional[str] = None
        if persistent:
            try:
                with localfarm.farm_lock(self.root):
                    self._find_or_start(daemons, slots)
            except BaseException:
                _stop_processes(self._procs)  # what this call started, never an attached farm
                raise
            return
        try:
            self._start_hub()
            for _ in range(daemons):  # type: ignore[arg-type]
                self.add_daemon(wait=False)
            self.wait_for_daemons(len(self.daemon_processes))
        except BaseException:
            self.close()
            raise

    # -- the persistent farm ---------------------------------------------------

    def _saved_token(self, filename: str, role: str, label: str) -> str:
        """The token in ``root/filename`` if the store still honours it, else a new one saved there."""
        path = self.root / filename
        token = localfarm.read_secret(path)
        if token is not None:
            store = auth.open_state_dir(self.state_dir)
            try:
                row = store.token(auth.hash_token(token))
            finally:
                store.close()
            if row is not None and row["role"] == role and not row["revoked"]:
                return token
        token = self.create_token(role, self.user, label=label)
        localfarm.write_secret(path, token)
        return token

    def _answers(self, address: str) -> bool:
        hub = Hub(address, token=self.token, connect_timeout=5.0, ssl=self.ca_file)
        try:
            hub.connect_sync()
            return True
        except Exception:
            return False
        finally:
            try:
                hub.close_sync()
            except Exception:
                pass

    def _find_or_start(self, daemons: Optional[int], slots: Optional[int]) -> None:
        """Attach to the recorded farm if its hub runs and answers; else start
        one on the same state dir (and ports, when free)."""
        record = localfarm.read_record(self.root)
        hub = localfarm.AdoptedProcess(record.hub_pid, self.root) if record else None
        if record is not None and hub is not None and hub.poll() is None and self._answers(record.address):
            conflict = localfarm.shape_conflict(record, daemons, slots)
            if conflict:
                raise ClusterError(conflict)
            self.attached = True
            self._started = record.started
            self.slots = record.slots
            self.port, self.address = record.port, record.address
            self.http_port, self.http_url = record.http_port, record.http_url
            self.hub_process = hub  # type: ignore[assignment]
            for name, pid in record.daemons.items():
                proc = localfarm.AdoptedProcess(pid, self.root)
                if proc.poll() is None:
                    self.daemon_processes[name] = proc  # type: ignore[assignment]
                else:
                    self.add_daemon(name, wait=False)  # it died: start it again
        else:
            if record is not None:  # a dead farm: end what is left of it, keep its ports and shape
                _stop_processes([localfarm.AdoptedProcess(pid, self.root) for pid in record.pids])  # type: ignore[misc]
                self.port, self.http_port = record.port, record.http_port or 0
                daemons = len(record.daemons) if daemons is None else daemons
                slots = record.slots if slots is None else slots
            self.slots = slots or 2
            try:
                self._start_hub()
            except ClusterError:
                if record is None:
                    raise
                self.port, self.http_port = 0, 0  # its old ports are taken: any free ones
                self._start_hub()
            for _ in range(2 if daemons is None else daemons):
                self.add_daemon(wait=False)
        self.wait_for_daemons(len(self.daemon_processes))
        self._write_record()

    def _write_record(self) -> None:
        assert self.hub_process is not None
        localfarm.write_record(self.root, localfarm.FarmRecord(
            root=str(self.root), address=self.address, hub_pid=self.hub_process.pid, port=self.port,
            slots=self.slots, daemons={n: p.pid for n, p in self.daemon_processes.items()},
            http_port=self.http_port or None, http_url=self.http_url,
            client_token_file=str(self.root / localfarm.CLIENT_TOKEN_FILE),
            daemon_token_file=str(self.root / localfarm.DAEMON_TOKEN_FILE),
            admin_token_file=str(self.state_dir / auth.ADMIN_TOKEN_FILE), log_dir=str(self.log_dir),
            started=getattr(self, "_started", None) or time.time(),
        ))

    def stop(self) -> list[int]:
        """Stop the processes: a persistent farm's recorded ones (whoever
        started them); returns the pids stopped."""
        if not self.persistent:
            pids = self.pids
            self.close()
            return pids
        stopped = localfarm.stop_farm(self.root)
        for proc in self._procs:  # reap the ones this process started
            proc.poll()
        return stopped

    # -- processes ----------------------------------------------------------

    def _spawn(self, name: str, args: list[str], module: str, secret: Optional[str] = None) -> subprocess.Popen:
        """Start ``python -m MODULE ARGS``; ``secret`` goes to its stdin as one line, then EOF."""
        log = open(self.log_dir / f"{name}.log", "ab")
        cmd = [sys.executable, "-m", module, *args]
        if not self.persistent:  # a persistent farm outlives this process on purpose
            cmd += ["--parent-pid", str(os.getpid())]
        # Own session: Jupyter's "interrupt kernel" signals the kernel's whole
        # process group, and Ctrl-C on a wait must not kill the hub and daemons;
        # a kernel's shutdown ends its process group's children too.
        # (--parent-pid still ends a non-persistent cluster with this process.)
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL if secret is None else subprocess.PIPE,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self._procs.append(proc)
        if secret is not None:
            assert proc.stdin is not None
            try:
                proc.stdin.write(secret.encode() + b"\n")
                proc.stdin.close()
            except BrokenPipeError:
                pass  # it died at once; wait_for_daemons reports it with its log
        return proc

    def _start_hub(self) -> None:
        ready = self.root / "hub.ready"
        ready.unlink(missing_ok=True)
        self.hub_process = self._spawn(
            "hub",
            ["--host", "127.0.0.1", "--port", str(self.port), "--state-dir", str(self.state_dir),
             "--ready-file", str(ready),
             "--http-port", "0" if self.http_port is None else (str(self.http_port) if self.http_port else "auto"),
             *self._hub_args],
            module="hub_server",
        )
        deadline = time.monotonic() + self.start_timeout
        while not ready.exists():
            if self.hub_process.poll() is not None:
                raise ClusterError(f"hub exited with code {self.hub_process.returncode}; see {self.log_dir / 'hub.log'}")
            if time.monotonic() > deadline:
                raise ClusterError(f"hub did not start within {self.start_timeout}s; see {self.log_dir / 'hub.log'}")
            time.sleep(0.02)
        host, port, *http = ready.read_text().split()
        self.port = int(port)
        self.address = f"{'wss' if self.ca_file else 'ws'}://{host}:{port}"
        if http:
            self.http_port = int(http[0])  # a restart keeps it
            self.http_url = f"{'https' if self.ca_file else 'http'}://{host}:{self.http_port}"

    def restart_hub(self) -> None:
        """Start the hub again on the same state dir and port (after a kill)."""
        if self.hub_process is not None and self.hub_process.poll() is None:
            raise ClusterError("the hub is still running")
        self._start_hub()

    def add_daemon(
        self,
        name: Optional[str] = None,
        *,
        slots: Optional[int] = None,
        tags: Optional[list[str]] = None,
        wait: bool = True,
        token: Optional[str] = None,
        args: Optional[list[str]] = None,
    ) -> str:
        """Start one more daemon process; returns its name.  ``token``: a daemon
        token of another owner (``create_token("daemon", "ann")``); ``args``: more
        ``hwf daemon`` options for this one (after the cluster's ``daemon_args``)."""
        if name is None:
            n = len(self.daemon_processes) + 1
            while f"daemon-{n}" in self.daemon_processes:
                n += 1
            name = f"daemon-{n}"
        workdir = self.root / name
        all_tags = self.tags + list(tags or [])
        argv = ["--hub", self.address, "--token-file", "-", "--name", name,
                "--slots", str(slots or self.slots), "--workdir", str(workdir), *self.daemon_args, *(args or [])]
        if all_tags:
            argv += ["--tags", ",".join(all_tags)]
        if self.ca_file:
            argv += ["--ca-file", self.ca_file]
        self.daemon_processes[name] = self._spawn(name, argv, module="hwf_daemon",
                                                    secret=token or self.daemon_token)
        self.daemon_slots[name] = slots or self.slots
        if wait:
            self.wait_for_daemons(names=[name])
        return name

    def stop_daemon(self, name: str, sig: int = signal.SIGINT, wait: bool = True) -> None:
        """SIGINT stops now; SIGTERM drains (running tasks finish first); SIGKILL kills."""
        proc = self.daemon_processes[name]
        if proc.poll() is None:
            proc.send_signal(sig)
            if wait:
                proc.wait(30)

    def wait_for_daemons(self, count: Optional[int] = None, names: Optional[list[str]] = None,
                         timeout: Optional[float] = None) -> None:
        """Block until the hub lists the daemons as online."""
        hub = self.hub()
        deadline = time.monotonic() + (timeout or self.start_timeout)
        try:
            while True:
                online = set(hub.get_hardware_pool_sync().names)
                if (names is None or set(names) <= online) and (count is None or len(online) >= count):
                    return
                for dname, proc in self.daemon_processes.items():
                    if proc.poll() is not None and (names is None or dname in names):
                        raise ClusterError(f"daemon {dname} exited with code {proc.returncode}; "
                                           f"see {self.log_dir / (dname + '.log')}")
                if time.monotonic() > deadline:
                    raise ClusterError(f"daemons did not register in time (online: {sorted(online)})")
                time.sleep(0.05)
        finally:
            if hub._pool_cache is not None:
                self._pool_cache = hub._pool_cache
            hub.close_sync()

    def create_token(self, role: str = "client", user: Optional[str] = None, *, label: str = "") -> str:
        """A new token for ``user`` (a daemon's owner), valid at once, also
        while the hub runs: e.g. a second user for a notebook or a test."""
        store = auth.open_state_dir(self.state_dir)
        try:
            return auth.create_token(store, role, user or self.user, label or f"LocalCluster {role}")
        finally:
            store.close()

    def revoke_token(self, token: str) -> None:
        """Revoke a token: the hub refuses it and closes its connections."""
        store = auth.open_state_dir(self.state_dir)
        try:
            row = store.token(auth.hash_token(token))
            if row is None:
                raise ValueError("not a token of this cluster")
            auth.revoke(store, [row["token_id"]])
        finally:
            store.close()

    def hub(self, **kwargs) -> Hub:
        """A client ``Hub`` for this cluster (``token=`` another, e.g. ``admin_token``)."""
        if self.ca_file:
            kwargs.setdefault("ssl", self.ca_file)
        kwargs.setdefault("token", self.token)
        hub = Hub(self.address, **kwargs)
        self._hubs.add(hub)
        return hub

    @property
    def pids(self) -> list[int]:
        if self.persistent:
            procs = [self.hub_process, *self.daemon_processes.values()]
            return [p.pid for p in procs if p is not None and p.poll() is None]
        return [p.pid for p in self._procs if p.poll() is None]

    def close(self) -> None:
        """Stop the processes; a persistent farm's keep running (see ``stop``)."""
        self._finalizer()

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        page = f" status page {self.http_url}/" if self.http_url else ""
        return f"<LocalCluster {self.address} daemons={list(self.daemon_processes)}{page}>"

    def _repr_html_(self) -> str:
        """A Dask-like card from what is known locally (processes, this machine's
        RAM) and the last pool a Hub of this cluster fetched: no network call."""
        from . import cards

        alive = [n for n, proc in self.daemon_processes.items() if proc.poll() is None]
        hub_state = "running" if self.hub_process is not None and self.hub_process.poll() is None else "stopped"
        slots = sum(self.daemon_slots.get(n, self.slots) for n in alive)
        rows = [("address", cards.code(self.address)), ("hub", cards.esc(hub_state)),
                ("daemons", cards.esc(f"{len(alive)} running of {len(self.daemon_processes)}, "
                                      f"{slots} slots")),
                ("memory", cards.esc(f"{cards.fmt_gb(_local_ram())} on this machine, shared by the daemons"))]
        caches = [c for c in [self._pool_cache, *(h._pool_cache for h in list(self._hubs))] if c is not None]
        pool, fetched = max(caches, key=lambda c: c[1]) if caches else (None, None)
        sections: list = []
        if pool is not None:
            pool_rows, sections = cards.pool_section(pool, fetched)
            rows += pool_rows
        rows.append(("state dir", cards.code(self.state_dir)))
        if self.persistent:
            rows.append(("lifetime", cards.esc("outlives kernel restarts; %hwf_local --stop ends it")))
        return cards.card("HWF LocalCluster", rows, status_url=f"{self.http_url}/" if self.http_url else None,
                          sections=sections)


def _local_ram() -> Optional[int]:
    """Physical RAM of this machine in bytes (None where sysconf cannot say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
