"""Run one command and measure its whole process tree.

A task's command is often a script that starts other programs, so the
numbers users care about (peak RAM, CPU time) are the tree's, not bash's.

* A command runs under ``bash -c``, or without bash when it is one program
  with plain arguments (shellwords.py: same argv, environment, program and
  errors as bash would give; if that exec fails, bash runs the command).
* Each command runs in a new session, so its process group holds the whole
  tree and one ``killpg`` stops all of it.
* Commands as the daemon's own user are started with Popen (CPython's vfork
  path: no copy of the daemon's memory) and reaped here.  Commands as
  another account (``user``) are started by the spawner (spawnerd.py), a
  small root process whose fork is cheap: the child chdir()s into the task
  dir, drops every group, switches gid and uid and execs.  The spawner
  reaps them and sends back their status and rusage.  The dir's ancestors
  must still be traversable for absolute paths to work.
* If the daemon is killed outright, nothing runs on unsupervised: its
  ``Guardian`` (guardian.py) kills the groups of its own children, and the
  spawner, seeing the daemon's end of their socket close, kills the groups
  of its children.  No ``preexec_fn`` is used: it would force a full
  ``fork()`` of the daemon.
* The child is reaped with ``os.wait4``: its ``rusage`` gives exact CPU
  time and peak RSS, including every descendant the command waited for.
  The event loop watches a pidfd of the child (Linux 5.3+), which becomes
  readable when the child exits, and then reaps it with ``WNOHANG``: no
  thread per child (a thread's start and its trips through the GIL cost
  more than the spawn of a small command).  Where pidfds are missing, a
  dedicated thread blocks in ``wait4`` instead (not a bounded pool: a long
  command must never delay the reaping of another).  What is left of the
  group is SIGKILLed while the leader is still a zombie, so its pid (the
  group's id) cannot have been reused by then (the spawner does the same).
* Only when the stage tracks RAM, a sampler sums the RSS of the process
  and all its descendants every ``sample_interval`` seconds and keeps the
  maximum, because ``ru_maxrss`` is the peak of the single largest
  process, not of the tree.  Shared pages are counted once per process, so
  the tree sum can overestimate a little.  A sample walks every process of
  the machine (to find the descendants), so untracked stages skip it.
* ``ru_maxrss`` has a Linux quirk: the direct child starts as a copy of its
  parent's address space (a vfork shares the daemon's, a fork copies the
  spawner's), and at ``exec`` the kernel records that RSS as the child's
  peak, so even ``true`` would "use" as much RAM as the daemon.  It is
  therefore only trusted when it exceeds the parent's RSS at spawn time
  (the ``floor``); below that, the sampled peak is the answer.  Each sample
  also reads every process's own ``VmHWM`` (peak RSS since its exec,
  Linux), so a peak between two samples is still seen by the next one; a
  peak reached after a short command's last sample, just before it exits,
  is missed when it stays below the floor (a known limit of sampling).

POSIX only: Windows has no ``os.wait4`` nor process groups.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Mapping, Optional, Sequence, Union

import psutil

from . import spawner as _spawner
from .shellwords import SHELL, direct

if TYPE_CHECKING:
    from .accounts import TaskUser
    from .isolation import Box

log = logging.getLogger(__name__)

# ru_maxrss is in KiB on Linux and in bytes on macOS.
_MAXRSS_UNIT = 1 if sys.platform == "darwin" else 1024


_guardian: Any = None
FAST_SAMPLING_SECONDS = 1.0
FAST_SAMPLE_INTERVAL = 0.01
_devnull_fd: Optional[int] = None


def set_guardian(guardian: Any) -> None:
    """Register the process that kills command groups if the daemon dies."""
    global _guardian
    _guardian = guardian


def shell_argv(cmd: str) -> list[str]:
    """How bash runs ``cmd`` (also the fallback of a direct exec that failed)."""
    return [SHELL, "-c", cmd]


def _popen(argv: list[str], exe: str, cwd: str, env: Mapping[str, str], stdin: bool = False) -> subprocess.Popen:
    # stdin is /dev/null (a task must never wait for input) unless the stage
    # gives its bytes (then a pipe the caller feeds); stdout and stderr are
    # pipes the caller must read.
    return subprocess.Popen(
        argv,
        executable=exe,
        cwd=cwd,
        env=env,
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def _limit_memory(pid: int, limit: int) -> None:
    """The fallback where no cgroup limits memory (isolation.py): RLIMIT_AS
    on the started command, set from outside (the vfork path has no hook
    before the exec), so it starts a moment before its limit does."""
    import resource

    try:
        resource.prlimit(pid, resource.RLIMIT_AS, (limit, limit))
    except (OSError, ValueError) as exc:
        log.debug("RLIMIT_AS on pid %d: %s", pid, exc)


def _devnull() -> int:
    global _devnull_fd
    if _devnull_fd is None:
        _devnull_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    return _devnull_fd


class _Feeder:
    """Writes a command's stdin bytes from the event loop (no thread), then
    closes the pipe; a command that stops reading just gets the rest dropped."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, data: bytes) -> None:
        self.loop, self.fd, self.view, self.pos = loop, fd, memoryview(data), 0
        os.set_blocking(fd, False)
        if data:
            loop.add_writer(fd, self._writable)
        else:
            self.close()

    def _writable(self) -> None:
        try:
            self.pos += os.write(self.fd, self.view[self.pos:self.pos + 65536])
        except BlockingIOError:
            return
        except OSError:  # EPIPE: the command exited or closed its stdin
            self.close()
            return
        if self.pos >= len(self.view):
            self.close()

    def close(self) -> None:
        if self.fd >= 0:
            self.loop.remove_writer(self.fd)
            os.close(self.fd)
            self.fd = -1


@dataclass(frozen=True)
class Usage:
    """How a command ended and what its tree used."""

    exit_code: int  # negative: killed by that signal (subprocess convention)
    cpu_time: float  # user + system seconds, command and reaped descendants
    peak_ram: int  # bytes: max(sampled tree RSS sum, ru_maxrss); 0 if RAM is not tracked


def _tree(proc: psutil.Process) -> list[psutil.Process]:
    """The process and all its descendants that still exist."""
    try:
        return [proc] + proc.children(recursive=True)
    except psutil.Error:
        return []


def _own_peak(pid: int) -> int:
    """A process's own peak RSS since its exec (Linux ``VmHWM``; 0 elsewhere).

    Unlike ``ru_maxrss`` it does not inherit the forking daemon's size, and
    one sample while the process lives gives its true peak, even a peak
    that came and went between samples.
    """
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _tree_rss(proc: psutil.Process, parent_cmdline: Optional[list[str]] = None) -> int:
    """The tree's RSS now, or its largest single process's peak if larger.

    0 while the command's process has not exec'd yet (it still runs its
    parent's image, ``parent_cmdline``): its RSS and VmHWM are then the
    daemon's (or the spawner's), not the command's."""
    if parent_cmdline:
        try:
            if proc.cmdline() == parent_cmdline:
                return 0
        except psutil.Error:
            return 0
    total = peak = 0
    for p in _tree(proc):
        try:
            total += p.memory_info().rss
        except psutil.Error:  # exited meanwhile, zombie, or not ours to see
            continue
        peak = max(peak, _own_peak(p.pid))
    return max(total, peak)


def _own_rss() -> int:
    try:
        return psutil.Process().memory_info().rss
    except psutil.Error:
        return 0


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class TrackedProcess:
    """A running command whose tree is sampled and which is reaped by ``wait4``.

    ``proc = await TrackedProcess.start(cmd, cwd, ...)`` inside a running
    event loop.  The caller owns ``proc.stdout`` / ``proc.stderr`` (binary
    pipes) and must read (and close) them.  Await ``wait()`` for the
    result; ``terminate()`` stops the tree politely, ``kill()`` at once.
    ``track_ram=False``: no RSS sampling (``Usage.peak_ram`` is then 0).
    ``direct`` tells whether the command runs without bash.
    """

    stdout: IO[bytes]
    stderr: IO[bytes]

    def __init__(self, cmd: str, *, sample_interval: float = 0.05, track_ram: bool = True) -> None:
        self.cmd = cmd
        self._interval = sample_interval
        self._track_ram = track_ram
        self.popen: Optional[subprocess.Popen] = None  # only for commands run as this user
        self.pid = 0
        self.pgid = 0
        self.direct = False
        self.started = time.perf_counter()
        self.ended: Optional[float] = None  # perf_counter when reaped
        self._rss_floor = 0
        self._peak_tree = 0
        self._usage: Optional[Usage] = None
        self._group_killed = False  # what was left of the group was SIGKILLed at exit
        self._proc: Optional[psutil.Process] = None
        self._parent = os.getpid()  # the process that reaps it (the spawner for another user)
        self._reaped: asyncio.Future  # -> (exit code, cpu seconds, ru_maxrss bytes)
        self._sampler: Optional[asyncio.Task] = None
        self._feeder: Optional[_Feeder] = None

    @classmethod
    async def start(
        cls,
        cmd: str,
        cwd: Union[str, Path],
        *,
        env: Optional[Mapping[str, str]] = None,
        user: Optional["TaskUser"] = None,
        sample_interval: float = 0.05,
        track_ram: bool = True,
        stdin: Optional[bytes] = None,
        box: Optional["Box"] = None,
    ) -> "TrackedProcess":
        """Start ``cmd`` in ``cwd`` with ``env`` (None: this process's) as
        ``user`` (None: as this process); ``stdin``: bytes to give it (None:
        /dev/null); ``box``: the task's walls (isolation.py; another user's
        commands only)."""
        self = cls(cmd, sample_interval=sample_interval, track_ram=track_ram)
        loop = asyncio.get_running_loop()
        cwd = os.fspath(cwd)
        env = dict(env) if env is not None else dict(os.environ)
        plan = direct(cmd, env, cwd, user)
        if user is None:
            threaded = self._start_here(loop, cmd, cwd, env, plan, stdin)
            if box is not None and box.rlimit_as:
                _limit_memory(self.pid, box.rlimit_as)
        else:
            await self._start_as(loop, cmd, cwd, env, plan, user, stdin, box)
            threaded = False
        # A psutil handle pins the process's identity (pid + start time).
        # Made lazily when nothing samples: the pid stays ours until it is
        # reaped (a reaper thread could reap it any time: then made now).
        if track_ram or threaded:
            self._handle()
        if track_ram:
            self._sampler = loop.create_task(self._sample_loop())
        return self

    def _start_here(self, loop: asyncio.AbstractEventLoop, cmd: str, cwd: str, env: dict[str, str],
                    plan: Any, stdin: Optional[bytes] = None) -> bool:
        """Popen (vfork) the command as this process; True if a thread reaps it."""
        if self._track_ram:
            self._rss_floor = _own_rss()  # see the ru_maxrss quirk above
        popen = None
        piped = stdin is not None
        if plan is not None:
            try:
                popen = _popen(plan.argv, plan.exe, cwd, plan.env, piped)
                self.direct = True
            except OSError:  # the exec failed: bash runs it, and says why
                pass
        if popen is None:
            popen = _popen(shell_argv(cmd), SHELL, cwd, env, piped)
        if popen.stdin is not None:
            fd = os.dup(popen.stdin.fileno())
            popen.stdin.close()
            popen.stdin = None
            self._feeder = _Feeder(loop, fd, stdin or b"")
        self.popen = popen
        assert popen.stdout is not None and popen.stderr is not None
        self.stdout, self.stderr = popen.stdout, popen.stderr
        self.pid = self.pgid = popen.pid  # start_new_session: the leader's pid names the group
        if _guardian is not None:
            _guardian.watch(self.pgid)
        self._reaped, threaded = self._start_reaper(loop)
        return threaded

    async def _start_as(self, loop: asyncio.AbstractEventLoop, cmd: str, cwd: str, env: dict[str, str],
                        plan: Any, user: "TaskUser", stdin: Optional[bytes] = None,
                        box: Optional["Box"] = None) -> None:
        """Have the spawner start the command as ``user``."""
        sp = _spawner.current()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        in_r, in_w = os.pipe() if stdin is not None else (-1, -1)
        try:
            fds = [_devnull() if in_r < 0 else in_r, out_w, err_w]
            if plan is not None:
                spawned = await sp.spawn(plan.exe, plan.argv, plan.env, cwd, user, fds,
                                         fallback=(SHELL, shell_argv(cmd), env), box=box)
                self.direct = not spawned.fell_back
            else:
                spawned = await sp.spawn(SHELL, shell_argv(cmd), env, cwd, user, fds, box=box)
        except BaseException:
            os.close(out_r)
            os.close(err_r)
            if in_w >= 0:
                os.close(in_w)
            raise
        finally:
            os.close(out_w)
            os.close(err_w)
            if in_r >= 0:
                os.close(in_r)
        if in_w >= 0:
            self._feeder = _Feeder(loop, in_w, stdin or b"")
        self.stdout = open(out_r, "rb", buffering=0)
        self.stderr = open(err_r, "rb", buffering=0)
        self.pid = self.pgid = spawned.pid
        self._parent = sp.pid or 0
        self._rss_floor = spawned.floor
        self._group_killed = True  # the spawner does it before it reaps
        self._reaped = loop.create_future()

        def reaped(fut: asyncio.Future) -> None:
            if fut.cancelled():
                self._reaped.cancel()
            elif fut.exception() is not None:
                self._reaped.set_exception(fut.exception())  # type: ignore[arg-type]
            else:
                status, utime, stime, maxrss = fut.result()
                self.ended = time.perf_counter()
                self._reaped.set_result((os.waitstatus_to_exitcode(status), utime + stime, maxrss))

        spawned.exited.add_done_callback(reaped)

    def _handle(self) -> Optional[psutil.Process]:
        if self._proc is None and not self._reaped.done():
            try:
                proc = psutil.Process(self.pid)
                # Still the process we started: its parent has not reaped it.
                if self._parent == os.getpid() or proc.ppid() == self._parent:
                    self._proc = proc
            except psutil.Error:
                pass
        return self._proc

    # -------------------------------------------------------------- reaping

    def _start_reaper(self, loop: asyncio.AbstractEventLoop) -> tuple[asyncio.Future, bool]:
        """A future of (exit code, cpu, maxrss); True if a thread reaps (no pidfd)."""
        future: asyncio.Future = loop.create_future()
        try:
            fd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):  # Linux < 5.3, or not Linux
            self._start_reaper_thread(loop, future)
            return future, True
        loop.add_reader(fd, self._on_exit, loop, fd, future)
        return future, False

    def _on_exit(self, loop: asyncio.AbstractEventLoop, fd: int, future: asyncio.Future) -> None:
        """The pidfd is readable: the child exited (it is a zombie until wait4)."""
        if future.done():  # cancelled under us; never leave the fd behind
            loop.remove_reader(fd)
            os.close(fd)
            return
        # The leader is a zombie, so its pid (the group id) is still ours:
        # killing the rest of the group now cannot hit a reused pid.
        self._signal_group(signal.SIGKILL)
        self._group_killed = True
        try:
            pid, status, rusage = os.wait4(self.pid, os.WNOHANG)
        except ChildProcessError as exc:  # reaped elsewhere
            loop.remove_reader(fd)
            os.close(fd)
            future.set_exception(exc)
            return
        if pid == 0:  # not exited after all (cannot happen for a pidfd; be safe)
            return
        loop.remove_reader(fd)
        os.close(fd)
        self._reaped_with(status, rusage, future)

    def _reaped_with(self, status: int, rusage: Any, future: asyncio.Future) -> None:
        assert self.popen is not None
        # Tell Popen the child is gone so it never waits for it again.
        self.popen.returncode = os.waitstatus_to_exitcode(status)
        self.ended = time.perf_counter()
        if not future.done():
            future.set_result((self.popen.returncode, rusage.ru_utime + rusage.ru_stime,
                               rusage.ru_maxrss * _MAXRSS_UNIT))

    def _start_reaper_thread(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future) -> None:
        def reap() -> None:
            try:
                _, status, rusage = os.wait4(self.pid, 0)
            except BaseException as exc:  # ChildProcessError: reaped elsewhere
                error = exc

                def fail() -> None:
                    if not future.done():
                        future.set_exception(error)

                deliver = fail
            else:
                def deliver() -> None:
                    self._reaped_with(status, rusage, future)

            try:
                loop.call_soon_threadsafe(deliver)
            except RuntimeError:  # the loop is closed: nobody is waiting
                pass

        threading.Thread(target=reap, name=f"hwf-wait4-{self.pid}", daemon=True).start()

    @property
    def done(self) -> bool:
        """True once the command (the group leader) has been reaped."""
        return self._reaped.done()

    @property
    def exited(self) -> asyncio.Future:
        """Done once the command has been reaped (await ``wait()`` for the result)."""
        return self._reaped

    async def wait(self) -> Usage:
        """Wait for the command to end; kill what it left behind; measure.

        Background processes still in the group when the command exits are
        SIGKILLed: they would otherwise hold the output pipes open and
        outlive the task.
        """
        if self._usage is None:
            try:
                exit_code, cpu_time, maxrss = await asyncio.shield(self._reaped)
            except ChildProcessError:
                raise RuntimeError(
                    f"the exit status of pid {self.pid} was collected by someone else"
                ) from None
            if not self._group_killed:  # reaped by the fallback thread
                self._signal_group(signal.SIGKILL)
            if _guardian is not None and self.popen is not None:
                _guardian.forget(self.pgid)
            if self._feeder is not None:
                self._feeder.close()  # what it did not read is dropped
            await self._stop_sampler()
            self._usage = Usage(exit_code=exit_code, cpu_time=cpu_time, peak_ram=self._peak_ram(maxrss))
        return self._usage

    def _peak_ram(self, maxrss: int) -> int:
        if self._sampler is None:
            return 0
        if maxrss > self._rss_floor:
            return max(self._peak_tree, maxrss)
        return self._peak_tree

    # -------------------------------------------------------------- sampling

    async def _sample_loop(self) -> None:
        if self._proc is None:
            return
        start = time.monotonic()
        try:
            parent_cmdline: Optional[list[str]] = psutil.Process(self._parent).cmdline()
        except psutil.Error:
            parent_cmdline = None
        while not self._reaped.done():
            # /proc scanning is blocking work: keep it off the event loop.
            rss = await asyncio.to_thread(_tree_rss, self._proc, parent_cmdline)
            self._peak_tree = max(self._peak_tree, rss)
            # Short commands are where a peak hides between samples (and
            # ru_maxrss cannot help below the daemon's own RSS): sample
            # densely during the first second, then at the normal pace.
            fast = time.monotonic() - start < FAST_SAMPLING_SECONDS
            await asyncio.sleep(min(self._interval, FAST_SAMPLE_INTERVAL) if fast else self._interval)

    async def _stop_sampler(self) -> None:
        if self._sampler is None:
            return
        self._sampler.cancel()
        await asyncio.wait([self._sampler])  # raises only if *we* are cancelled
        if not self._sampler.cancelled() and self._sampler.exception() is not None:
            log.warning("RSS sampler of pid %s failed: %r", self.pid, self._sampler.exception())

    # -------------------------------------------------------------- stopping

    def _snapshot(self) -> list[psutil.Process]:
        proc = self._handle()
        return _tree(proc) if proc is not None else []

    def _signal_group(self, sig: int, procs: Sequence[psutil.Process] = ()) -> None:
        try:
            os.killpg(self.pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        # Descendants that left the group (setsid, setpgid) are signalled by
        # pid; psutil checks each is still the same process first.
        for p in procs:
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass

    async def terminate(self, grace: float = 3.0) -> None:
        """SIGTERM the whole tree; SIGKILL whatever still runs after ``grace`` s."""
        procs = self._snapshot()
        self._signal_group(signal.SIGTERM, procs)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if self._reaped.done() and not any(_alive(p) for p in procs):
                return  # wait() SIGKILLs any late-born group members
            await asyncio.sleep(0.02)
        self._signal_group(signal.SIGKILL, procs)

    def kill(self) -> None:
        """SIGKILL the whole tree now (for paths that cannot await)."""
        self._signal_group(signal.SIGKILL, self._snapshot())
        if self._feeder is not None:
            self._feeder.close()
        if self._sampler is not None:
            self._sampler.cancel()
