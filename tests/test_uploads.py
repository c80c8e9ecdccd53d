"""The upload gate (hub_server/uploads.py) without sockets: who gets a slot, when it expires."""

from __future__ import annotations

from hub_server import protocol as p
from hub_server.uploads import UploadGate

LIMITS = p.Limits(max_uploads_per_connection=2, max_uploads_per_user=3, max_uploads=4, max_daemon_uploads=2)


def test_per_connection_per_user_and_pool_limits_name_their_flags():
    g = UploadGate(LIMITS, idle_timeout=10)
    assert g.admit(1, 1, "u:b", False, 10, now=0) is None
    assert g.admit(1, 2, "u:b", False, 10, now=0) is None
    code, text = g.admit(1, 3, "u:b", False, 10, now=0)
    assert code == "limit" and "--max-uploads-per-connection" in text
    assert g.admit(2, 1, "u:b", False, 10, now=0) is None
    code, text = g.admit(3, 1, "u:b", False, 10, now=0)
    assert code == "limit" and "'b' has 3 uploads open" in text and "--max-uploads-per-user" in text
    assert g.admit(4, 1, "u:c", False, 10, now=0) is None
    code, text = g.admit(5, 1, "u:d", False, 10, now=0)
    assert code == "busy" and "max_uploads=4" in text and "--max-uploads" in text
    # Daemons have their own pool, untouched by the clients' flood.
    assert g.admit(6, 1, "d:lab", True, 10, now=0) is None
    assert g.admit(7, 1, "d:lab", True, 10, now=0) is None
    code, text = g.admit(8, 1, "d:other", True, 10, now=0)
    assert code == "busy" and "--max-daemon-uploads" in text
    assert (g.count(False), g.count(True)) == (4, 2)
    assert g.open_bytes("u:b") == 30


def test_silent_uploads_expire_and_free_their_slots():
    g = UploadGate(LIMITS, idle_timeout=10)
    assert g.admit(1, 1, "u:b", False, 10, now=0) is None
    assert g.admit(1, 2, "u:b", False, 10, now=0) is None
    g.received(1, 2, now=8)  # bytes keep this one alive
    assert g.expired(now=9) == []
    assert g.expired(now=10.5) == [(1, 1)]
    assert not g.is_open(1, 1) and g.is_open(1, 2)
    assert g.expired(now=18.5) == [(1, 2)]
    assert (g.count(False), g.open_bytes("u:b")) == (0, 0)
    assert "--upload-idle-timeout" in g.expiry_message()
    assert g.admit(1, 3, "u:b", False, 10, now=20) is None


def test_a_closed_connection_releases_everything_it_held():
    g = UploadGate(LIMITS, idle_timeout=10)
    for tid in (1, 2):
        assert g.admit(1, tid, "u:b", False, 5, now=0) is None
    assert g.admit(2, 1, "u:b", False, 5, now=0) is None
    g.release_peer(1)
    assert g.count(False) == 1 and g.open_bytes("u:b") == 5
    g.release(2, 1)
    g.release(2, 1)  # twice is harmless
    assert g.count(False) == 0 and g.open_bytes("u:b") == 0
