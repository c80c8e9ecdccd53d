"""The daemon's blob cache: downloaded once per daemon, checked on every use.

A blob is verified when it is downloaded (hub_server/link.py ``_Sink``),
but a file on disk can change afterwards: a disk error, an admin's slip,
or (before tasks ran as other users) a task rewriting
``../../blob-cache/<sha>``.  Copying a cached blob into a task dir
therefore hashes it in the same pass, and a copy whose hash is wrong is
discarded by the caller, which downloads the blob again.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import BinaryIO

from hub_server.blobs import BlobStore

_CHUNK = 1 << 20


def open_cache(root: Path) -> BlobStore:
    """The cache at ``root``, readable by the daemon's user alone (0700)."""
    store = BlobStore(root)
    os.chmod(root, 0o700)
    return store


def copy_verified(src: Path, dest: BinaryIO, sha256: str) -> bool:
    """Copy ``src`` into ``dest`` from its start; True if the bytes hash to ``sha256``.

    ``dest`` is rewound and truncated first, so a retry starts clean.
    """
    dest.seek(0)
    dest.truncate()
    h = hashlib.sha256()
    with open(src, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
            dest.write(block)
    dest.flush()
    return h.hexdigest() == sha256
