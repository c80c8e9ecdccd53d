"""Collect a task's artifacts with no more rights than the task had.

The daemon may be root while its task is not: a task that links
``d -> /etc`` and asks for ``d/shadow`` must get an error, not the file.
So a match is resolved (every symlink, directories included) and must
land inside the task dir; then it is opened by walking that resolved path
with ``O_NOFOLLOW`` at every step (see safefs.py) and uploaded from the
open file, so a symlink swapped in after the check cannot redirect the
read.  Glob patterns do not descend through symlinked directories that
lead out either: such a branch is reported, never listed (listing would
tell the task's user what lies in a directory the task could not read).
"""

from __future__ import annotations

import asyncio
import fnmatch
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Awaitable, BinaryIO, Callable, Optional

from hub_server.protocol import ArtifactInfo

from .safefs import UnsafePath, open_for_reading

# upload_artifact(open file, name) -> (sha256, size)
UploadArtifact = Callable[[BinaryIO, str], Awaitable[tuple[str, int]]]

_MAGIC = re.compile(r"[*?[]")


@dataclass(frozen=True)
class Match:
    name: str  # as the pattern reached it, relative to the task dir
    error: Optional[str] = None


def pattern_error(pattern: str) -> Optional[str]:
    """Why ``pattern`` can never name a file inside the task dir, or None."""
    if not pattern or not pattern.strip():
        return "empty artifact pattern"
    if pattern.startswith(("/", "\\")) or PurePosixPath(pattern).is_absolute():
        return f"artifact pattern {pattern!r} must be relative to the work directory"
    if ".." in PurePosixPath(pattern.replace("\\", "/")).parts:
        return f"artifact pattern {pattern!r} must not contain '..'"
    return None


def _outside(name: str) -> str:
    return f"{name!r} resolves outside the task directory"


class _Matcher:
    """pathlib-style glob (``*``, ``?``, ``[..]``, ``**``) that will not leave ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(os.path.realpath(root))
        self.found: dict[str, Match] = {}

    def _inside(self, path: str) -> bool:
        return Path(path).is_relative_to(self.root)

    def select(self, cur: Path, rel: PurePosixPath, parts: tuple[str, ...]) -> None:
        part, rest = parts[0], parts[1:]
        if part == "**":
            if rest:
                self.select(cur, rel, rest)
            for entry in self._entries(cur):
                if entry.is_dir(follow_symlinks=False):  # like pathlib: ** follows no links
                    self.select(cur / entry.name, rel / entry.name, parts)
        elif _MAGIC.search(part):
            for entry in self._entries(cur):
                if fnmatch.fnmatchcase(entry.name, part):
                    self._step(cur / entry.name, rel / entry.name, rest)
        elif os.path.lexists(cur / part):
            self._step(cur / part, rel / part, rest)

    @staticmethod
    def _entries(cur: Path) -> list[os.DirEntry]:
        try:
            with os.scandir(cur) as it:
                return sorted(it, key=lambda e: e.name)
        except OSError:
            return []

    def _step(self, path: Path, rel: PurePosixPath, rest: tuple[str, ...]) -> None:
        name = rel.joinpath(*rest).as_posix() if rest else rel.as_posix()
        if path.is_symlink():
            target = os.path.realpath(path)
            if not self._inside(target):
                self.found.setdefault(name, Match(name, _outside(name)))
                return
            path = Path(target)
        if rest:
            if path.is_dir():
                self.select(path, rel, rest)
        elif path.is_file():
            self.found.setdefault(name, Match(name))


def match_files(root: Path, pattern: str) -> list[Match]:
    """Files ``pattern`` names under ``root``, and matches that lead outside it (as errors)."""
    parts = PurePosixPath(pattern).parts
    matcher = _Matcher(root)
    if parts:
        matcher.select(matcher.root, PurePosixPath(), tuple(parts))
    return sorted(matcher.found.values(), key=lambda m: m.name)


def open_match(root: Path, name: str, owner: Optional[int]) -> BinaryIO:
    """Open the file ``name`` leads to, refusing anything outside ``root``."""
    real_root = os.path.realpath(root)
    target = os.path.realpath(os.path.join(real_root, name))
    if not Path(target).is_relative_to(real_root) or target == real_root:
        raise UnsafePath(_outside(name))
    return open_for_reading(Path(real_root), os.path.relpath(target, real_root), owner, label=name)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def collect_artifacts(
    patterns: list[str],
    workdir: Path,
    upload_artifact: UploadArtifact,
    owner: Optional[int] = None,
) -> list[ArtifactInfo]:
    """Upload every file the patterns name; one ``ArtifactInfo`` per file or problem.

    ``owner``: the task's uid when it ran as another user; files it does
    not own (a hard link to someone else's file) are refused.
    """
    infos: list[ArtifactInfo] = []
    for pattern in patterns:
        error = pattern_error(pattern)
        if error is not None:
            infos.append(ArtifactInfo(pattern=pattern, error=error))
            continue
        try:
            matches = await asyncio.to_thread(match_files, workdir, pattern)
        except (ValueError, OSError) as exc:
            infos.append(ArtifactInfo(pattern=pattern, error=f"bad pattern {pattern!r}: {exc}"))
            continue
        if not matches:
            infos.append(ArtifactInfo(pattern=pattern, error=f"no file matches {pattern!r}"))
        for m in matches:
            infos.append(await _collect_one(pattern, m, workdir, upload_artifact, owner))
    return infos


async def _collect_one(pattern: str, m: Match, workdir: Path, upload_artifact: UploadArtifact,
                       owner: Optional[int]) -> ArtifactInfo:
    if m.error is not None:
        return ArtifactInfo(pattern=pattern, name=m.name, error=m.error)
    try:
        f = await asyncio.to_thread(open_match, workdir, m.name, owner)
    except UnsafePath as exc:
        return ArtifactInfo(pattern=pattern, name=m.name, error=str(exc))
    except OSError as exc:  # ELOOP: a symlink appeared on the way; gone; ...
        return ArtifactInfo(pattern=pattern, name=m.name,
                            error=f"cannot read {m.name!r}: {exc.strerror or _describe(exc)}")
    try:
        with f:
            sha, size = await upload_artifact(f, m.name)
    except Exception as exc:
        return ArtifactInfo(pattern=pattern, name=m.name,
                            error=f"upload of {m.name!r} failed: {_describe(exc)}")
    return ArtifactInfo(pattern=pattern, name=m.name, sha256=sha, size=size)
