"""Content-addressed file store: ``<root>/<sha[:2]>/<sha>``.

A file sent twice is stored once.  Writes go to a temporary file that is
renamed into place only after its sha256 and size check out, so a crash or
a lying peer never leaves a wrong blob under a real hash.  The temporary
file is opened at the first byte, not at the announcement, so announcing
uploads costs no file descriptors.  ``max_bytes`` bounds the whole store:
announced sizes are reserved until the upload ends.

A blob's file mtime is when it was last stored or used (``touch``): garbage
collection (blobgc.py) spares blobs used within its grace period.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Optional

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class BlobError(ValueError):
    pass


def check_sha(sha256: str) -> str:
    if not isinstance(sha256, str) or not SHA256_RE.match(sha256):
        raise BlobError(f"not a sha256 hex digest: {sha256!r}")
    return sha256


def file_sha256(path: Path | str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return h.hexdigest()
            h.update(block)


def fileobj_sha256(f: BinaryIO, chunk: int = 1 << 20) -> str:
    """sha256 of an open binary file from its start (its position is left at the end)."""
    f.seek(0)
    h = hashlib.sha256()
    while block := f.read(chunk):
        h.update(block)
    return h.hexdigest()


class BlobStore:
    def __init__(self, root: Path | str, max_bytes: Optional[int] = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)
        self._tmp = self.root / "tmp"
        self._tmp.mkdir(exist_ok=True)
        for stale in self._tmp.iterdir():  # uploads cut off by a crash
            stale.unlink(missing_ok=True)
        self.max_bytes = max_bytes
        self.reserved = 0
        self.stored_bytes = self._scan_size()
        self._touched: dict[str, float] = {}  # sha -> monotonic time of its last touch

    # touch() skips a blob touched less than this many seconds ago: a submit of
    # 20,000 tasks on one Data file costs one utime, not 20,000.
    TOUCH_EVERY = 10.0

    def _scan_size(self) -> int:
        total = 0
        for shard in os.scandir(self.root):
            if shard.is_dir() and len(shard.name) == 2:
                total += sum(e.stat().st_size for e in os.scandir(shard.path) if e.is_file())
        return total

    def reserve(self, size: int) -> None:
        """Book room for an upload; BlobError when the store would overflow."""
        if self.max_bytes is not None and self.stored_bytes + self.reserved + size > self.max_bytes:
            raise BlobError(
                f"blob store is full: {self.stored_bytes + self.reserved} of max_blob_store_bytes="
                f"{self.max_bytes} used; a file of {size} bytes does not fit"
            )
        self.reserved += size

    def path(self, sha256: str) -> Path:
        check_sha(sha256)
        return self.root / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def size(self, sha256: str) -> int:
        return self.path(sha256).stat().st_size

    def touch(self, sha256: str) -> None:
        """Mark the blob used now (its mtime), so GC keeps it for its grace period."""
        now = time.monotonic()
        if now - self._touched.get(sha256, -self.TOUCH_EVERY) < self.TOUCH_EVERY:
            return
        if len(self._touched) > 100_000:
            self._touched.clear()
        self._touched[sha256] = now
        try:
            os.utime(self.path(sha256))
        except FileNotFoundError:
            pass

    def listing(self) -> dict[str, tuple[int, float]]:
        """Every stored blob: sha256 -> (size, mtime)."""
        out = {}
        for shard in os.scandir(self.root):
            if shard.is_dir() and len(shard.name) == 2:
                for e in os.scandir(shard.path):
                    if SHA256_RE.match(e.name):
                        try:
                            st = e.stat()
                        except FileNotFoundError:  # deleted meanwhile
                            continue
                        out[e.name] = (st.st_size, st.st_mtime)
        return out

    def mtime(self, sha256: str) -> Optional[float]:
        try:
            return self.path(sha256).stat().st_mtime
        except FileNotFoundError:
            return None

    def delete(self, sha256: str) -> int:
        """Remove a blob (garbage collection); returns the bytes freed."""
        path = self.path(sha256)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        self._touched.pop(sha256, None)
        self.stored_bytes -= size
        return size

    def writer(self, sha256: str, size: int) -> "BlobWriter":
        """A writer for one upload; reserves ``size`` bytes until it ends."""
        check_sha(sha256)
        self.reserve(size)
        return BlobWriter(self, sha256, size)

    def read_chunks(self, sha256: str, chunk: int) -> Iterator[bytes]:
        with open(self.path(sha256), "rb") as f:
            while True:
                block = f.read(chunk)
                if not block:
                    return
                yield block

    def put_file(self, src: Path | str) -> tuple[str, int]:
        """Copy a local file in (used by daemons' caches and tests)."""
        sha = file_sha256(src)
        size = Path(src).stat().st_size
        if not self.has(sha):
            w = self.writer(sha, size)
            with open(src, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    w.write(block)
            w.finish()
        return sha, size


class BlobWriter:
    """Receives a blob's bytes in order; ``finish()`` verifies and publishes."""

    def __init__(self, store: BlobStore, sha256: str, size: int) -> None:
        self.store, self.sha256, self.size = store, sha256, size
        self.received = 0
        self._hash = hashlib.sha256()
        self._file: Any = None
        self._tmpname: Optional[str] = None
        self._ended = False

    @property
    def complete(self) -> bool:
        return self.received >= self.size

    def _open(self) -> None:
        fd, name = tempfile.mkstemp(dir=self.store._tmp, prefix=self.sha256[:12] + ".")
        self._file = os.fdopen(fd, "wb")
        self._tmpname = name

    def write(self, data: bytes | memoryview) -> None:
        if self.received + len(data) > self.size:
            self.abort()
            raise BlobError(
                f"blob {self.sha256[:12]}: got more than the announced {self.size} bytes"
            )
        if self._file is None:
            self._open()
        self._file.write(data)
        self._hash.update(data)
        self.received += len(data)

    def finish(self) -> Path:
        if self._file is None:
            self._open()  # a zero-byte blob
        self._file.close()
        if self.received != self.size:
            self.abort()
            raise BlobError(f"blob {self.sha256[:12]}: got {self.received} of {self.size} bytes")
        if self._hash.hexdigest() != self.sha256:
            self.abort()
            raise BlobError(f"blob {self.sha256[:12]}: content does not match its sha256")
        dest = self.store.path(self.sha256)
        dest.parent.mkdir(exist_ok=True)
        existed = dest.exists()
        os.replace(self._tmpname, dest)  # type: ignore[arg-type]
        self._end(stored=0 if existed else self.size)
        return dest

    def abort(self, reason: Optional[str] = None) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()
        if self._tmpname is not None:
            try:
                os.unlink(self._tmpname)
            except FileNotFoundError:
                pass
        self._end(stored=0)

    def _end(self, stored: int) -> None:
        if not self._ended:
            self._ended = True
            self.store.reserved -= self.size
            self.store.stored_bytes += stored
