"""Bearer tokens with roles, stored hashed in the hub's SQLite store.

Only the sha256 of a token is stored; the token itself is shown once, when
it is created.  On first start the hub writes an admin token to
``<state_dir>/admin.token`` with mode 0600.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Optional

from .protocol import ROLES
from .store import Store

ADMIN_TOKEN_FILE = "admin.token"
DB_FILE = "hub.sqlite3"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r} (roles: {', '.join(ROLES)})")
    return f"hwf_{role[0]}_{secrets.token_urlsafe(24)}"


def create_token(store: Store, role: str, label: str = "") -> str:
    token = new_token(role)
    store.add_token(hash_token(token), role, label)
    return token


def role_of(store: Store, token: Optional[str]) -> Optional[str]:
    if not token:
        return None
    role = store.token_role(hash_token(token))
    return role


def bearer(header: Optional[str]) -> Optional[str]:
    """The token of an ``Authorization: Bearer <token>`` header."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if not hmac.compare_digest(scheme.lower().encode(), b"bearer"):
        return None
    return value.strip() or None


def open_state_dir(state_dir: Path | str) -> Store:
    """Create the state dir (0700) and its store; write the admin token once."""
    state = Path(state_dir)
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = Store(state / DB_FILE)
    token_file = state / ADMIN_TOKEN_FILE
    if not token_file.exists():
        token = create_token(store, "admin", "initial admin token")
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
    return store


def read_admin_token(state_dir: Path | str) -> str:
    return (Path(state_dir) / ADMIN_TOKEN_FILE).read_text().strip()
