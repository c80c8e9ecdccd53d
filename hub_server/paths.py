"""Which relative paths a task may use inside its working directory."""

from __future__ import annotations

from typing import Optional


def unsafe_relative_path(path: str) -> Optional[str]:
    """Why ``path`` may not be used inside a task's working directory, or None."""
    if not path or not path.strip():
        return "is empty"
    if path.startswith(("/", "\\")) or (len(path) > 1 and path[1] == ":"):
        return "is absolute; it must be relative to the task's working directory"
    parts = path.replace("\\", "/").split("/")
    if ".." in parts:
        return "climbs out of the task's working directory with '..'"
    if "\x00" in path:
        return "contains a NUL byte"
    return None
