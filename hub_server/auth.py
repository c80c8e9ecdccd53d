"""Bearer tokens with roles and users, stored hashed in the hub's SQLite store.

Every token names who it speaks for: a client or admin token its *user*, a
daemon token its *owner* (whoever contributes the machine).  Only the
sha256 of a token is stored; the token itself is shown once, when it is
created.  A token has a public id (``tok-...``) for listing and revoking.
On first start the hub writes an admin token to ``<state_dir>/admin.token``
with mode 0600.
"""

from __future__ import annotations

import getpass
import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from .protocol import ROLES
from .store import Store

ADMIN_TOKEN_FILE = "admin.token"
DB_FILE = "hub.sqlite3"
ADMIN_USER = "admin"
# Users and owners appear in ids, logs and file names: keep them plain.
USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


class AuthError(ValueError):
    """A token operation that cannot be done; the text says why."""


@dataclass(frozen=True)
class Principal:
    """Who a connection speaks for: the token's id, role and user (owner)."""

    token_id: str
    role: str
    user: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def blob_scope(self) -> str:
        """The name under which this principal's readable blobs are listed."""
        return f"d:{self.user}" if self.role == "daemon" else f"u:{self.user}"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token(role: str) -> str:
    if role not in ROLES:
        raise AuthError(f"unknown role {role!r} (roles: {', '.join(ROLES)})")
    return f"hwf_{role[0]}_{secrets.token_urlsafe(24)}"


def check_user(user: str) -> str:
    if not isinstance(user, str) or not USER_RE.match(user):
        raise AuthError(
            f"user/owner name {user!r} must be 1-64 letters, digits or . _ @ - (starting with a letter or digit)"
        )
    return user


def default_user() -> str:
    """The local account name: whom a token is for when no --user is given."""
    try:
        return check_user(getpass.getuser())
    except (AuthError, KeyError, OSError):
        return "local"


def create_token(store: Store, role: str, user: Optional[str] = None, label: str = "") -> str:
    """Make a token for ``user`` (a daemon's owner); returns the token, stored hashed."""
    token = new_token(role)
    user = check_user(user if user is not None else (ADMIN_USER if role == "admin" else default_user()))
    store.add_token(hash_token(token), f"tok-{secrets.token_hex(5)}", role, user, label)
    return token


def authenticate(store: Store, token: Optional[str]) -> Union[Principal, str]:
    """The token's Principal, or why it is refused."""
    if not token:
        return "missing token"
    row = store.token(hash_token(token))
    if row is None:
        return "invalid token"
    if row["revoked"] is not None:
        return "token revoked"
    return Principal(token_id=row["token_id"], role=row["role"], user=row["user"])


def revoke(store: Store, token_ids: list[str] = (), user: Optional[str] = None) -> list[str]:  # type: ignore[assignment]
    """Revoke tokens by id or every token of a user; unknown ids are an error."""
    if user is None and not token_ids:
        raise AuthError("name the token ids to revoke, or --user NAME")
    if user is None:
        unknown = set(token_ids) - store.known_token_ids(list(token_ids))
        if unknown:
            raise AuthError(f"unknown token id(s): {', '.join(sorted(unknown))}")
    return store.revoke_tokens(token_ids=list(token_ids), user=user)


def bearer(header: Optional[str]) -> Optional[str]:
    """The token of an ``Authorization: Bearer <token>`` header."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if not hmac.compare_digest(scheme.lower().encode(), b"bearer"):
        return None
    return value.strip() or None


def open_state_dir(state_dir: Path | str) -> Store:
    """Open the state dir and its store, private (0700) whatever it was before;
    write the admin token once."""
    state = Path(state_dir)
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(state, 0o700)  # mkdir's mode does not apply to a dir that existed
    store = Store(state / DB_FILE)
    token_file = state / ADMIN_TOKEN_FILE
    if not token_file.exists():
        token = create_token(store, "admin", ADMIN_USER, "initial admin token")
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
    os.chmod(token_file, 0o600)
    return store


def read_admin_token(state_dir: Path | str) -> str:
    return (Path(state_dir) / ADMIN_TOKEN_FILE).read_text().strip()
