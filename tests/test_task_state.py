import pytest

from hub_server import task_state as ts


def test_happy_path():
    for a, b in [("queued", "assigned"), ("assigned", "running"), ("running", "finished")]:
        ts.check(a, b)


def test_retry_path():
    ts.check("running", "retrying")
    ts.check("retrying", "queued")


@pytest.mark.parametrize("a,b", [("finished", "running"), ("cancelled", "queued"),
                                 ("queued", "running"), ("failed", "finished")])
def test_refused(a, b):
    with pytest.raises(ts.InvalidTransition, match=a):
        ts.check(a, b)


def test_after_loss():
    assert ts.after_loss(1, 3) == "retrying"
    assert ts.after_loss(4, 3) == "failed"
    assert ts.after_loss(1, 0) == "failed"
