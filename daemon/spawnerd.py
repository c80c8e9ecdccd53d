"""The spawner: a small root process that starts a daemon's commands as other users.

Why a process of its own: CPython's subprocess can only vfork (no copy of
the daemon's memory) when the child keeps the parent's uid; switching uid
forces a full ``fork()`` of the daemon, which costs in proportion to its
size (3.3 ms per command from a 30 MB daemon here, on the event loop).
Going through util-linux ``setpriv`` keeps vfork but adds an exec of
setpriv with its libraries and locale (1.7 ms of CPU per command).  This
process imports only the standard library (``python -I -S``: ~10 MB), so
its ``fork()`` is cheap; subprocess's child (C code, no Python between
fork and exec) switches uid and execs the command, and the exec of a
command that cannot run is reported back, so the daemon's bash-free plan
(shellwords.py) can fall back to bash with no second message.  A
command's leftovers are killed the same way: a forked child becomes the
slot's uid and calls ``kill(-1, SIGKILL)``, with no exec at all.

Every command is this process's child, so it also reaps them: it sends
back the exit status and the ``wait4`` rusage (exact CPU time, and
``ru_maxrss``, which starts from this process's own RSS at fork: the
daemon compares it with the ``floor`` sent at start).  Before reaping a
command it SIGKILLs what is left of its process group (the leader is a
zombie then, so the group's id cannot have been reused).  When the daemon
goes away (its end of the socket closes, even after ``kill -9``), every
command group still running is SIGKILLed and the spawner exits: for the
commands it starts, it is the daemon's guardian.

Protocol, over a ``SOCK_STREAM`` unix socket pair: frames of a 4-byte
big-endian length and a ``marshal``-ed tuple; file descriptors travel
with the first bytes of their frame (``SCM_RIGHTS``).

    daemon -> spawner
      ("spawn", rid, exe, argv, env, cwd, uid, gid, fallback, box)  + fds stdin, stdout, stderr
          exec ``exe`` with ``argv``; if that exec fails, ``fallback``
          (exe, argv, env) when given.  uid/gid None: keep root's.
          ``box`` None, or (key, (ns, tmp, shared, rebind, procs, home, gen)):
          start it in that box's namespaces (if ``ns``) and cgroup
          (``Walls``), built at the key's first use; a new ``gen`` of a
          key gets a new IPC namespace
      ("unbox", 0, key)             forget a box (its namespaces go with their last process)
      ("kill", rid, uid, gid)       SIGKILL every process of that uid
    spawner -> daemon
      ("started", rid, pid, fell_back, floor)
      ("error", rid, errno, text)   nothing could be started
      ("exit", pid, status, utime, stime, maxrss_kib)
      ("killed", rid, ok)           ok False: could not become the uid

``python -I -S spawnerd.py FD``: serve on socket FD.
``python -I -S spawnerd.py --kill-as UID GID``: just become UID/GID and
SIGKILL every process of that uid (the blocking form, at daemon start-up).
``python -I -S spawnerd.py --probe``: exit 0 if this process can unshare
its mount and IPC namespaces and mount a hidepid procfs (else 1, and why).
"""

import errno
import marshal
import os
import resource
import selectors
import signal
import socket
import struct
import subprocess
import sys

_HEADER = struct.Struct(">I")
_MAX_FRAME = 64 << 20
_MAX_FDS = 3


# Walling commands in (isolation.py decides what; this does it).  Running
# Python in the child between fork and exec (subprocess's preexec_fn) cost
# 0.7 ms of CPU per command here, more than the walls themselves; so the
# spawner builds each task's namespaces in itself, without a fork: it
# unshares its own mount and IPC namespaces, mounts, keeps an fd of each
# namespace, and returns to its own (setns: 2 us).  A command of the task
# is then forked on subprocess's C path while the spawner stands, for that
# moment, in the task's namespaces and cgroup: the child is born inside
# them, before it can run anything (the cgroup too: moving it after the
# exec would let it fork outside first).
CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 8, 4096, 16384, 1 << 18
_libc = None


def _syscalls():
    global _libc
    if _libc is None:
        import ctypes

        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _check(ret, what):
    if ret != 0:
        import ctypes

        code = ctypes.get_errno()
        raise OSError(code, "%s: %s" % (what, os.strerror(code)))


def _write(path, data):
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


class _Unwalled(Exception):
    """A task's namespaces or cgroup could not be set up: no fallback can help."""

    def __str__(self):
        return ("the command could not be isolated (%s); hwf daemon --isolation none runs commands without"
                % (self.args[0],))


class Walls:
    """This process's own namespaces, and the tasks' it built (by key)."""

    def __init__(self):
        self.own = None  # (mnt fd, ipc fd), opened on first use
        # Whether this process may step out of the OOM killer's way while
        # inside a task's cgroup (CAP_SYS_RESOURCE; some containers deny it).
        self.shielded = True
        self.boxes = {}  # key -> (mnt fd, ipc fd, [task cgroup.procs], [home cgroup.procs])

    def _own(self):
        if self.own is None:
            self.own = (os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC),
                        os.open("/proc/self/ns/ipc", os.O_RDONLY | os.O_CLOEXEC))
        return self.own

    def build(self, tmp, shared, taskdir):
        """New mount and IPC namespaces: ``tmp`` over each ``shared`` dir,
        ``taskdir`` (the task dirs' root) bound back at its own path if it lay under one, a procfs
        with hidepid=2 (only the uid's own processes show); (mnt fd, ipc fd)."""
        libc = _syscalls()
        own = self._own()
        # The dir holding ``tmp`` (``/tmp``, often) is covered last: ``tmp`` must still resolve before.
        shared = sorted(shared, key=lambda d: bool(tmp) and (tmp == d or tmp.startswith(d + "/")))
        rebind = taskdir if tmp and taskdir and any(taskdir == d or taskdir.startswith(d + "/") for d in shared) else None
        _check(libc.unshare(CLONE_NEWNS | CLONE_NEWIPC), "unshare")
        try:
            _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")
            if rebind is not None:
                os.chdir(rebind)  # held: still reachable once /tmp is covered
            for d in shared if tmp else ():
                _check(libc.mount(tmp.encode(), d.encode(), None, MS_BIND, None), "bind mount over " + d)
            if rebind is not None:
                os.makedirs(rebind, exist_ok=True)
                _check(libc.mount(b".", rebind.encode(), None, MS_BIND, None), "bind mount of the task dir")
            _check(libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, b"hidepid=2"),
                   "mount proc with hidepid=2")
            return (os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC),
                    os.open("/proc/self/ns/ipc", os.O_RDONLY | os.O_CLOEXEC))
        finally:
            self.enter(own)
            os.chdir("/")

    def enter(self, fds):
        libc = _syscalls()
        _check(libc.setns(fds[0], CLONE_NEWNS), "setns mnt")
        _check(libc.setns(fds[1], CLONE_NEWIPC), "setns ipc")

    def fresh_ipc(self):
        """A new, empty IPC namespace (an fd to it); this process stays in its own."""
        libc = _syscalls()
        own = self._own()
        _check(libc.unshare(CLONE_NEWIPC), "unshare ipc")
        try:
            return os.open("/proc/self/ns/ipc", os.O_RDONLY | os.O_CLOEXEC)
        finally:
            _check(libc.setns(own[1], CLONE_NEWIPC), "setns ipc")

    def box(self, key, spec):
        """The namespaces of box ``key``: built from ``spec`` on first use and
        kept (a slot's box serves its tasks one after another: its mounts are
        built once); a new ``gen`` (the next task) gets a fresh IPC namespace,
        so no SysV object passes from one task to the next."""
        ns, tmp, shared, rebind, procs, home, gen = spec
        got = self.boxes.get(key)
        if got is None:
            fds = self.build(tmp, shared, rebind) if ns else (None, None)
            got = self.boxes[key] = [*fds, procs, home, gen]
        elif got[4] != gen:
            if got[1] is not None:
                ipc = self.fresh_ipc()
                os.close(got[1])
                got[1] = ipc
            got[2], got[3], got[4] = procs, home, gen
        return got[:4]

    def close(self, key):
        got = self.boxes.pop(key, None)
        if got is not None and got[0] is not None:
            os.close(got[0])
            os.close(got[1])

    def inside(self, key, spec, start):
        """``start()`` (a fork) in box ``key``'s namespaces and cgroups; its
        result.  _Unwalled if the walls could not be put up."""
        try:
            mnt, ipc, procs, home = self.box(key, spec)
            if mnt is not None:
                self.enter((mnt, ipc))
        except OSError as exc:
            if self.own is not None:
                self.enter(self.own)
            raise _Unwalled(exc) from None
        joined = shielded = False
        try:
            if procs:
                if self.shielded:
                    try:  # not the OOM killer's pick while inside (the child is reset after)
                        _write("/proc/self/oom_score_adj", b"-1000")
                        shielded = True
                    except OSError:
                        self.shielded = False
                try:
                    joined = True
                    for path in procs:
                        _write(path, b"0")
                except OSError as exc:
                    raise _Unwalled(exc) from None
            return start()
        finally:
            if joined:
                for path in home:
                    _write(path, b"0")
            if shielded:
                _write("/proc/self/oom_score_adj", b"0")
            if mnt is not None:
                self.enter(self._own())


def _become(uid, gid):
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def _kill_all_as(uid, gid):
    """Become uid/gid and SIGKILL every process of that uid (not this one)."""
    _become(uid, gid)
    try:
        os.kill(-1, signal.SIGKILL)
    except ProcessLookupError:  # no other process at all
        pass


class Spawner:
    def __init__(self, sock):
        self.sock = sock
        sock.setblocking(False)
        self.inbuf = bytearray()
        self.infds = []
        self.out = bytearray()
        self.writing = False
        self.commands = set()  # pids of running commands (unreaped)
        self.popens = {}  # pid -> its Popen, kept so that Popen never reaps it itself
        self.killers = {}  # pid -> rid
        self.walls = Walls()
        self.sel = selectors.DefaultSelector()
        self.wake_r, wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.sel.register(self.sock, selectors.EVENT_READ)
        self.sel.register(self.wake_r, selectors.EVENT_READ)

    # ------------------------------------------------------------- plumbing

    def send(self, *msg):
        data = marshal.dumps(msg)
        self.out += _HEADER.pack(len(data)) + data
        self.flush()

    def flush(self):
        while self.out:
            try:
                n = self.sock.send(self.out)
            except BlockingIOError:
                break
            except OSError:  # the daemon is gone: run() notices at the next read
                self.out.clear()
                break
            del self.out[:n]
        if bool(self.out) != self.writing:
            self.writing = bool(self.out)
            self.sel.modify(self.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if self.writing else 0))

    def receive(self):
        """Read what is there; False once the daemon has closed its end."""
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.sock, 1 << 16, _MAX_FDS * 4,
                                                           socket.MSG_CMSG_CLOEXEC)
            except BlockingIOError:
                return True
            except OSError:
                return False
            self.infds.extend(fds)
            if not data:
                return False
            self.inbuf += data
            while len(self.inbuf) >= _HEADER.size:
                (size,) = _HEADER.unpack_from(self.inbuf)
                if size > _MAX_FRAME:
                    return False
                if len(self.inbuf) < _HEADER.size + size:
                    break
                msg = marshal.loads(bytes(self.inbuf[_HEADER.size:_HEADER.size + size]))
                del self.inbuf[:_HEADER.size + size]
                self.handle(msg)

    def run(self):
        while True:
            for key, events in self.sel.select():
                if key.fileobj is self.sock:
                    if events & selectors.EVENT_WRITE:
                        self.flush()
                    if events & selectors.EVENT_READ and not self.receive():
                        self.shutdown()
                        return
                else:
                    try:
                        while os.read(self.wake_r, 512):
                            pass
                    except BlockingIOError:
                        pass
                    self.reap()

    def shutdown(self):
        """The daemon is gone: nothing it started may run on unsupervised."""
        for pid in self.commands:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
        for pid in list(self.commands) + list(self.killers):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass

    # ------------------------------------------------------------- requests

    def handle(self, msg):
        kind, rid = msg[0], msg[1]
        if kind == "spawn":
            fds, self.infds = self.infds[:_MAX_FDS], self.infds[_MAX_FDS:]
            try:
                self.spawn(rid, *msg[2:], fds=fds)
            finally:
                for fd in fds:
                    os.close(fd)
        elif kind == "unbox":
            self.walls.close(msg[2])
        elif kind == "kill":
            uid, gid = msg[2], msg[3]
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                code = 0
                try:
                    _kill_all_as(uid, gid)
                except BaseException:
                    code = 1
                os._exit(code)
            self.killers[pid] = rid

    def spawn(self, rid, exe, argv, env, cwd, uid, gid, fallback, box=None, fds=()):
        if len(fds) != _MAX_FDS:
            self.send("error", rid, errno.EBADF, "the spawn request came without its 3 file descriptors")
            return
        pid, err = self.start(exe, argv, env, cwd, uid, gid, fds, box)
        fell_back = False
        if pid is None and fallback is not None and err[0] != -1:
            fell_back = True
            pid, err = self.start(*fallback, cwd, uid, gid, fds, box)
        if pid is None:
            code, text = err
            self.send("error", rid, code, text)
            return
        self.commands.add(pid)
        floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.send("started", rid, pid, fell_back, floor)

    def start(self, exe, argv, env, cwd, uid, gid, fds, box=None):
        """fork + exec; (pid, None), or (None, (errno, text)) if it failed.

        subprocess does the child's part in C (_posixsubprocess): a child
        running Python between fork and exec touches (so copies) pages all
        over the interpreter, and took twice as long to exec here (2.0 ms
        instead of 1.1).  The child chdir()s as root, drops every group,
        switches gid and uid, restores SIGPIPE/SIGXFSZ and execs; an error
        before or at the exec comes back as the exception."""
        ids = {} if uid is None else {"user": uid, "group": gid, "extra_groups": []}

        def start():
            return subprocess.Popen(argv, executable=exe, stdin=fds[0], stdout=fds[1], stderr=fds[2], cwd=cwd,
                                    env=env, start_new_session=True, **ids)

        try:
            if box is None:
                proc = start()
            else:
                try:
                    proc = self.walls.inside(box[0], box[1], start)
                except _Unwalled as exc:
                    return None, (-1, str(exc))
                if box[1][4] and self.walls.shielded:
                    try:  # born with the spawner's -1000 while inside the cgroup
                        _write("/proc/%d/oom_score_adj" % proc.pid, b"0")
                    except OSError:
                        pass
        except OSError as exc:
            text = exc.strerror or str(exc)
            if exc.filename is not None:
                text = f"{text}: {exc.filename}"
            return None, (exc.errno or 0, text)
        except (ValueError, TypeError) as exc:  # a NUL in a string, a bad env...
            return None, (0, str(exc))
        self.popens[proc.pid] = proc  # this process reaps it; Popen must never try
        return proc.pid, None

    # ------------------------------------------------------------- children

    def reap(self):
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None:
                return
            pid = info.si_pid
            if pid in self.commands:
                # A zombie still holds its pid, hence the group's id: the
                # rest of the group is killed before the id can be reused.
                try:
                    os.killpg(pid, signal.SIGKILL)
                except OSError:
                    pass
            _, status, ru = os.wait4(pid, 0)
            proc = self.popens.pop(pid, None)
            if proc is not None:
                proc.returncode = os.waitstatus_to_exitcode(status)
            if pid in self.commands:
                self.commands.discard(pid)
                self.send("exit", pid, status, ru.ru_utime, ru.ru_stime, ru.ru_maxrss)
            elif pid in self.killers:
                rid = self.killers.pop(pid)
                self.send("killed", rid, os.waitstatus_to_exitcode(status) == 0)


def main(argv):
    if argv[:1] == ["--probe"]:  # can this machine wall a command in? (isolation.py asks)
        try:
            Walls().build(None, [], None)
        except OSError as exc:
            print(exc, file=sys.stderr)
            return 1
        return 0
    if argv[:1] == ["--kill-as"]:
        _kill_all_as(int(argv[1]), int(argv[2]))
        return 0
    # Ctrl-C is the daemon's to handle.  A handler, not SIG_IGN: an ignored
    # signal would stay ignored in the commands through their exec.
    signal.signal(signal.SIGINT, lambda *_: None)
    sock = socket.socket(fileno=int(argv[0]))
    Spawner(sock).run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
