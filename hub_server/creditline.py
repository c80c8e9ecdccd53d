"""CreditPiggy's daemon line protocol, parsed into the hub's credit messages.

Job managers written against the CreditPiggy daemon (its ``creditpiggy``
Python library, ``nc`` in shell hooks) send one command per connection or
datagram and read a two-byte answer:

    ALLOC,slot=<id>,[min=n,max=n|credits=n],[expire=minutes]
    CLAIM,slot=<id>,machine=<id>,[credits=n]
    DISCARD,slot=<id>,[reason=...]
    COUNTERS,slot=<id>,name=n,...
    META,slot=<id>,name=v,...

Wire details follow the real daemon (``creditpiggy-daemon.py``), so those
clients work unchanged: it reads one ``recv`` of up to 1500 bytes, strips
surrounding whitespace (a trailing ``\\n`` or ``\\r\\n`` is fine, none is
fine too: its library sends none), upper-cases the command (the library
sends ``alloc``, ``claim``...), splits fields on ``,`` and ``=``, and answers
exactly ``OK`` or ``ER``, with no line end and no message: the library does
``recv(4) == "OK"``, so ``OK\\n`` would read as a failure.  The reason for an
``ER`` is logged on the hub instead.  Fields may come in any order (the
library builds them from a dict); the daemon's comment spells CLAIM's
amount ``credit=``, its library ``credits=``: both are accepted.

A shared secret (``--creditpiggy-secret-file``) guards tcp and udp, where
any local process -- a task included -- can reach the port: there the first
field of every line is ``SECRET=<secret>`` (any case), then the command as
above, e.g. ``SECRET=k3y,ALLOC,slot=job-17,credits=5``.  A unix socket keeps
the daemon's trust by file permissions: its lines need no secret (one given
is checked all the same).  Secrets are compared in constant time.

Stricter than the daemon, because here a line changes a ledger directly:
unknown keys, repeated keys, empty values, non-numbers, control characters,
non-UTF-8 and over-long lines are refused (``ER``) rather than passed on.
No I/O here: ``creditserver.py`` owns the sockets.
"""

from __future__ import annotations

import hmac
import math
import re
from typing import Any, Optional, Union

import msgspec

from . import protocol as p

# The real daemon reads one 1500-byte recv; a little more room here for
# many counters, still small enough that a line is never a memory problem.
MAX_LINE_BYTES = 4096
# The command, slot and up to 64 counters or meta values (protocol limits).
MAX_FIELDS = 72

OK = b"OK"
ER = b"ER"

CreditRequest = Union[p.CreditAlloc, p.CreditClaim, p.CreditDiscard, p.CreditCounters, p.CreditMeta]

_INT = re.compile(r"-?[0-9]{1,18}\Z")
_NUMBER = re.compile(r"-?[0-9]{1,18}(\.[0-9]{1,18})?([eE][-+]?[0-9]{1,3})?\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class LineError(ValueError):
    """A line that is not a valid CreditPiggy command; the text says why."""


def parse(data: bytes, rid: int, *, secret: Optional[str] = None, need_secret: bool = False) -> CreditRequest:
    """One command (a read or a datagram) -> the credit request with id ``rid``.
    ``need_secret``: the line must open with ``SECRET=<secret>`` (tcp, udp)."""
    if len(data) > MAX_LINE_BYTES:
        raise LineError(f"line of {len(data)} bytes exceeds the limit of {MAX_LINE_BYTES}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LineError(f"line is not UTF-8 (byte {exc.start})") from None
    text = text.strip()
    if not text:
        raise LineError("empty line")
    if "\n" in text or "\r" in text:
        raise LineError("one command per connection or datagram (the line holds a line end)")
    bad = _CONTROL.search(text)
    if bad:
        raise LineError(f"control character {bad.group()!r} at offset {bad.start()}")
    parts = _check_secret(text.split(","), secret, need_secret)
    if len(parts) > MAX_FIELDS:
        raise LineError(f"{len(parts)} fields exceed the limit of {MAX_FIELDS}")
    command = parts[0].upper()
    build = _COMMANDS.get(command)
    if build is None:
        raise LineError(f"unknown command {parts[0][:32]!r} (expected {', '.join(_COMMANDS)})")
    fields = _fields(parts[1:])
    slot = fields.pop("slot", None)
    if slot is None:
        raise LineError(f"{command}: missing 'slot'")
    return _typed(build(rid, slot, fields), command)


def reply(msg: Any) -> bytes:
    """The answer line for the core's reply to a command: ``OK`` or ``ER``."""
    return OK if isinstance(msg, (p.Ok, p.CreditClaimed)) else ER


# ------------------------------------------------------------------ helpers


def _check_secret(parts: list[str], secret: Optional[str], need_secret: bool) -> list[str]:
    """The fields after a valid ``SECRET=`` field; LineError (never echoing
    what was given) when it is missing where needed, or wrong."""
    key, eq, given = parts[0].partition("=")
    if not (eq and key.upper() == "SECRET"):
        if need_secret:
            raise LineError("no secret: over tcp and udp a line starts with SECRET=<secret>, "
                            "the secret in --creditpiggy-secret-file")
        return parts
    if secret is None:
        raise LineError("the line gives a secret but the hub has none (--creditpiggy-secret-file)")
    if not hmac.compare_digest(given.encode(), secret.encode()):
        raise LineError("wrong secret")
    if len(parts) == 1:
        raise LineError("a secret and no command")
    return parts[1:]


def _fields(parts: list[str]) -> dict[str, str]:
    fields: dict[str, str] = {}
    for part in parts:
        key, eq, value = part.partition("=")
        if not eq:
            raise LineError(f"field {part[:40]!r} is not key=value")
        if not key:
            raise LineError(f"field {part[:40]!r} has no key")
        if not value:
            raise LineError(f"{key[:40]!r} has an empty value")
        if key in fields:
            raise LineError(f"{key[:40]!r} is given twice")
        fields[key] = value
    return fields


def _only(command: str, fields: dict[str, str], allowed: tuple[str, ...]) -> None:
    extra = [k for k in fields if k not in allowed]
    if extra:
        known = ", ".join(("slot",) + allowed)
        raise LineError(f"{command}: unknown key {extra[0][:40]!r} (known: {known})")


def _int(key: str, value: str) -> int:
    if not _INT.match(value):
        raise LineError(f"{key}={value[:40]!r} is not an integer")
    return int(value)


def _number(key: str, value: str) -> Union[int, float]:
    if _INT.match(value):
        return int(value)
    if not _NUMBER.match(value):
        raise LineError(f"{key}={value[:40]!r} is not a number")
    number = float(value)
    if not math.isfinite(number):
        raise LineError(f"{key}={value[:40]!r} is not a finite number")
    return number


def _amount(fields: dict[str, str], key: str, alias: str = "") -> Any:
    """``credits`` (or its ``credit`` spelling) as an int, or None."""
    if alias and alias in fields:
        if key in fields:
            raise LineError(f"give {key!r} or {alias!r}, not both")
        return _int(key, fields.pop(alias))
    return _int(key, fields.pop(key)) if key in fields else None


def _alloc(rid: int, slot: str, fields: dict[str, str]) -> dict[str, Any]:
    _only("ALLOC", fields, ("min", "max", "credits", "credit", "expire"))
    msg: dict[str, Any] = {"type": "credit_alloc", "id": rid, "slot": slot,
                           "credits": _amount(fields, "credits", "credit")}
    for key in ("min", "max"):
        if key in fields:
            msg[key] = _int(key, fields[key])
    if "expire" in fields:
        minutes = _number("expire", fields["expire"])
        if minutes <= 0:
            raise LineError(f"expire={fields['expire']!r} must be a positive number of minutes")
        msg["expire"] = minutes * 60.0
    return msg


def _claim(rid: int, slot: str, fields: dict[str, str]) -> dict[str, Any]:
    _only("CLAIM", fields, ("machine", "credits", "credit"))
    if "machine" not in fields:
        raise LineError("CLAIM: missing 'machine'")
    return {"type": "credit_claim", "id": rid, "slot": slot, "machine": fields.pop("machine"),
            "credits": _amount(fields, "credits", "credit")}


def _discard(rid: int, slot: str, fields: dict[str, str]) -> dict[str, Any]:
    _only("DISCARD", fields, ("reason",))
    return {"type": "credit_discard", "id": rid, "slot": slot, "reason": fields.get("reason")}


def _counters(rid: int, slot: str, fields: dict[str, str]) -> dict[str, Any]:
    counters = {_check(k, p.CounterName, f"counter name {k[:40]!r}"):
                _check(_number(k, v), p.CounterValue, f"counter {k[:40]!r}") for k, v in fields.items()}
    return {"type": "credit_counters", "id": rid, "slot": slot, "counters": counters}


def _meta(rid: int, slot: str, fields: dict[str, str]) -> dict[str, Any]:
    meta = {_check(k, p.CounterName, f"meta name {k[:40]!r}"): _check(v, p.Text, f"meta {k[:40]!r}")
            for k, v in fields.items()}
    return {"type": "credit_meta", "id": rid, "slot": slot, "meta": meta}


def _check(value: Any, typ: Any, label: str) -> Any:
    """``value`` if it meets the protocol type ``typ``; else say which field fails."""
    try:
        return msgspec.convert(value, typ)
    except msgspec.ValidationError as exc:
        raise LineError(f"{label}: {exc}") from None


_COMMANDS = {"ALLOC": _alloc, "CLAIM": _claim, "DISCARD": _discard, "COUNTERS": _counters, "META": _meta}


def _typed(msg: dict[str, Any], command: str) -> CreditRequest:
    """Check the fields against the protocol's bounds (the same ones a
    websocket request meets), naming the key that is out of range."""
    try:
        return msgspec.convert(msg, p.Message)  # type: ignore[return-value]
    except msgspec.ValidationError as exc:
        problem, _, where = str(exc).partition(" - at `$.")
        key = where.rstrip("`").split("[", 1)[0] or "?"
        raise LineError(f"{command}: {key}: {problem}") from None
