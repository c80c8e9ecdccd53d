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
          ``box`` None, or (tmp, shared, procs): wall the command in first
          (see ``_walled``).
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


# Walling a command in (isolation.py decides what; this does it, in the
# child, as root, before the uid switch).  subprocess's preexec_fn runs
# after its own user=/group= switch, too late for unshare and mount, so the
# child switches itself.  Python in the child costs a fork instead of a
# vfork and ~0.2 ms more per command (isolation.py has the numbers).
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


def _walled(box, cwd, uid, gid):
    """The child's part: a mount and IPC namespace of its own; the private
    dir ``tmp`` over every shared dir (``/tmp``, ``/var/tmp``, ``/dev/shm``
    ...), the task dir (``cwd``, already entered) bound back at its own path
    if it lay under one; a procfs with hidepid=2, which shows only the
    uid's own processes; each cgroup.procs in ``procs`` joined; then
    the uid.  Every byte string is made here, before the fork."""
    tmp, shared, procs = box
    # The dir holding ``tmp`` (``/tmp``, often) is covered last: ``tmp`` must still resolve before.
    shared = sorted(shared, key=lambda d: bool(tmp) and (tmp == d or tmp.startswith(d + "/")))
    tmp = tmp.encode() if tmp else None
    shared = [d.encode() for d in shared] if tmp else []
    rebind = None
    if tmp and cwd and any(cwd == d or cwd.startswith(d + "/") for d in box[1]):
        rebind = cwd.encode()
    procs = [p.encode() for p in procs]
    libc = _syscalls()

    def child():
        for path in procs:  # first: everything the command ever forks is counted
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)
        _check(libc.unshare(CLONE_NEWNS | CLONE_NEWIPC), "unshare")
        _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")
        for d in shared:
            _check(libc.mount(tmp, d, None, MS_BIND, None), "bind mount over " + d.decode())
        if rebind is not None:
            os.makedirs(rebind, exist_ok=True)
            _check(libc.mount(b".", rebind, None, MS_BIND, None), "bind mount of the task dir")
        _check(libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, b"hidepid=2"),
               "mount proc with hidepid=2")
        if uid is not None:
            _become(uid, gid)

    return child


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
        if box is not None:
            ids = {"preexec_fn": _walled(box, cwd, uid, gid)}
        else:
            ids = {} if uid is None else {"user": uid, "group": gid, "extra_groups": []}
        try:
            proc = subprocess.Popen(argv, executable=exe, stdin=fds[0], stdout=fds[1], stderr=fds[2], cwd=cwd,
                                    env=env, start_new_session=True, **ids)
        except subprocess.SubprocessError:  # the walling in failed: no fallback can help
            return None, (-1, "the command could not be isolated (namespaces, mounts or cgroups refused); "
                              "hwf daemon --isolation none runs it without")
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
            _walled((None, [], []), None, None, None)()
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
