"""Garbage collection of blobs nothing refers to any more.

A stored blob is **referenced**, and kept, while any of these holds:

1. it is a Data file (Python pickles and big arguments included) of a task
   that has not ended (queued, assigned, running, retrying): the task may
   still run, or run again;
2. it is an artifact in a task's stored result (results are kept for good,
   so a result's artifacts stay downloadable);
3. it is the file of a Manager API job (``job_files``, per user and job id);
4. it was stored or used less than ``grace`` seconds ago (its file mtime:
   the hub touches a blob whenever it tells a peer the blob is there,
   accepts it in a submit, a job file or a result).  So an upload just done
   but not yet submitted, or a file a client was just told it need not send
   again, survives until its task is in the store.

Data files of tasks that ended are not kept: a later task that needs the same
file uploads it again (the client asks which files the hub is missing first).

Safety while the hub runs: the reads of 1-3 come from a snapshot taken in a
thread (``read_blob_references``), then the hub's core makes the final cut in
its event loop, where nothing else happens at the same time: a candidate is
spared if an unfinished task holds it or it was touched since (every new
reference touches its blob first).  ``hwf blobs gc`` therefore asks a running
hub to collect; only when no hub holds the state dir (``statelock.py``) does
it collect on its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from .blobs import BlobStore
from .store import read_blob_references

Listing = dict[str, tuple[int, float]]  # sha256 -> (size, mtime)


def plan(listing: Listing, referenced: set[str], now: float, grace: float) -> list[str]:
    """The blobs to delete: not referenced, and neither stored nor used for ``grace`` seconds."""
    cutoff = now - grace
    return sorted(sha for sha, (_size, mtime) in listing.items() if sha not in referenced and mtime < cutoff)


def candidates(db_path: Path | str, blobs: BlobStore, now: float, grace: float) -> tuple[list[str], Listing]:
    """Rules 1-4 over a snapshot (run it in a thread); the core re-checks before deleting."""
    listing = blobs.listing()
    return plan(listing, read_blob_references(db_path), now, grace), listing


def totals(listing: Listing, gone: Iterable[str]) -> tuple[int, int, int, int]:
    """(deleted, deleted_bytes, kept, kept_bytes) of a listing once ``gone`` are deleted."""
    gone = set(gone)
    freed = sum(listing[s][0] for s in gone if s in listing)
    stored = sum(size for size, _ in listing.values())
    return len(gone), freed, len(listing) - len(gone), stored - freed
