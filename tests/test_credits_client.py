"""The client side of credits without processes: argument checking, endpoint
parsing and the DataFrame shapes."""

from __future__ import annotations

import pandas as pd
import pytest

from hub_server import protocol as p
from hwf_jupyter.credits import NotSetUp, cpapi_alloc, endpoint_url
from hwf_jupyter.dispatch import credit_spec_of
from hwf_jupyter.magics import _credits_arg
from hwf_jupyter.tally import slots_frame, tally_frame
from hwf_jupyter.task import TaskError


def test_endpoint_kinds():
    assert endpoint_url("/var/run/hwf.sock") == "unix:/var/run/hwf.sock"
    assert endpoint_url("127.0.0.1:5667") == "ws://127.0.0.1:5667"
    assert endpoint_url("wss://farm.example:8765") == "wss://farm.example:8765"
    assert endpoint_url("unix:/x.sock") == "unix:/x.sock"
    with pytest.raises(ValueError, match="websockets"):
        endpoint_url("https://cp.org/api")
    with pytest.raises(ValueError, match="neither"):
        endpoint_url("just-a-name")


def test_dispatch_credits_are_checked():
    assert credit_spec_of(None) is None
    assert credit_spec_of(5) == p.CreditSpec(credits=5)
    assert credit_spec_of((2, 9)) == p.CreditSpec(min=2, max=9)
    for bad, words in ((-1, ">= 0"), ((5, 2), "min <= max"), ("3", "whole number"), (True, "whole number"),
                       ((1, 2, 3), "whole number"), ((1.5, 2), "whole number")):
        with pytest.raises(TaskError, match=words):
            credit_spec_of(bad)
    assert _credits_arg("4") == 4 and _credits_arg("1:8") == (1, 8) and _credits_arg(None) is None


def test_calls_before_setup_say_so():
    import hwf_jupyter.credits as c
    c._hub = None
    with pytest.raises(NotSetUp, match="cpapi_setup"):
        cpapi_alloc("s", credits=1)


def test_tally_frame_ranks_by_credits_and_spreads_counters():
    rows = [p.CreditTallyRow(key="b", credits=5, slots=2, counters={"tasks": 2, "frames": 7}),
            p.CreditTallyRow(key="a", credits=9, slots=1, pending=9, counters={"tasks": 1, "cpu_seconds": 1.5}),
            p.CreditTallyRow(key=None, credits=5, slots=1, pending=5)]
    df = tally_frame("owner", rows)
    assert list(df.columns) == ["rank", "owner", "credits", "tasks", "cpu_seconds", "wall_seconds", "gpu_seconds",
                                "frames", "pending", "slots"]
    assert list(df["owner"][:2]) == ["a", "b"] and pd.isna(df.loc[2, "owner"]) and list(df["rank"]) == [1, 2, 3]
    assert df.loc[1, "frames"] == 7 and df.loc[0, "frames"] == 0 and df.loc[0, "pending"] == 9
    assert tally_frame("machine", []).empty


def test_slots_frame():
    s = p.CreditSlotInfo(slot="x", state="claimed", user="u", credits=3, machine="m", allocated=1.0, ended=2.0,
                         counters={"tasks": 1}, meta={"k": "v"})
    df = slots_frame([s])
    assert df.loc[0, "slot"] == "x" and df.loc[0, "counters"] == {"tasks": 1} and df.loc[0, "meta"] == {"k": "v"}
    assert str(df["ended"].dtype).startswith("datetime64")
