"""The CreditPiggy facade, the credit DataFrames and %hwf_credits / CreditBoard,
against a real hub (websocket over TCP and over a unix socket) and daemons."""

from __future__ import annotations

import json
import os

import pytest

import hwf_jupyter.credits as cp
from hwf_jupyter import LocalCluster, Stage, Task, dispatch_sync
from hwf_jupyter.widgets.credits import CreditBoard
from kernel_driver import Kernel

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    sock = tmp_path_factory.mktemp("sock") / "hub.sock"
    with LocalCluster(daemons=2, slots=2, hub_args=["--unix", str(sock)]) as c:
        c.sock = sock
        yield c


@pytest.mark.parametrize("kind", ["unix", "hostport", "url"])
def test_the_facade_over_each_endpoint_kind(farm, kind):
    host_port = farm.address.split("://", 1)[1]
    endpoint = {"unix": str(farm.sock), "hostport": host_port, "url": farm.address}[kind]
    cp.cpapi_setup(endpoint, farm.token)  # a client: the job manager of its own slots
    slot = f"job-{kind}"
    assert cp.cpapi_alloc(slot, min=2, max=8, expire=30) is True
    assert cp.cpapi_counters(slot, frames=12, errors=0)
    assert cp.cpapi_meta(slot, scene="intro", quality=3)
    with pytest.raises(cp.CreditError, match="already exists"):
        cp.cpapi_alloc(slot, credits=1)
    cp.cpapi_setup(endpoint, farm.daemon_token)  # a daemon token writes no slot (issue 18)
    with pytest.raises(cp.CreditError, match="daemon token cannot allocate, claim"):
        cp.cpapi_claim(slot, "render-node-1", credits=5)
    cp.cpapi_setup(endpoint, ("project-1", farm.token))  # CreditPiggy's (project, auth) pair
    assert cp.cpapi_claim(slot, "render-node-1", credits=50)
    with pytest.raises(cp.CreditError, match="already claimed"):
        cp.cpapi_claim(slot, "render-node-1")
    cp.cpapi_alloc(f"{slot}-d", credits=1)
    cp.cpapi_alloc(f"{slot}-a", credits=2)
    cp.cpapi_setup(endpoint, farm.admin_token)  # an admin names a user's slot USER/NAME
    cp.cpapi_discard(f"{farm.user}/{slot}-d", reason="invalid")
    assert cp.cpapi_claim(f"{farm.user}/{slot}-a", "render-node-2")
    hub = farm.hub()
    df = hub.credit_slots_sync()
    row = df[df["slot"] == slot].iloc[0]
    assert (row["state"], row["credits"], row["machine"]) == ("claimed", 8, "render-node-1")  # clamped to max
    assert row["counters"] == {"frames": 12, "errors": 0} and row["meta"] == {"scene": "intro", "quality": "3"}
    assert df[df["slot"] == f"{slot}-a"].iloc[0]["machine"] == "render-node-2"
    (d,) = df[df["slot"] == f"{slot}-d"].itertuples()
    assert (d.state, d.reason) == ("discarded", "invalid")
    assert (d.expires - d.allocated).total_seconds() == pytest.approx(24 * 3600)
    (r,) = df[df["slot"] == slot].itertuples()
    assert (r.expires - r.allocated).total_seconds() == pytest.approx(30 * 60)  # expire= in minutes
    hub.close_sync()


def test_tallies_as_dataframes_match_the_task_credits_column(farm):
    hub = farm.hub()
    sub = dispatch_sync(Task(Stage("s", cmd="true")), hub, repeat=12, credits=(2, 4))
    fixed = dispatch_sync(Task(Stage("s", cmd="true")), hub, repeat=3, credits=7)
    res = hub.get_result_sync(list(sub) + list(fixed), wait=True, timeout=120)
    tasks = res.to_dataframe()
    assert set(tasks.loc[tasks["task_id"].isin(fixed), "credits"]) == {7}
    assert tasks.loc[tasks["task_id"].isin(sub), "credits"].between(2, 4).all()
    mine = hub.credit_tally_sync(by="session")
    for s in (sub, fixed):
        row = mine[mine["session"] == s.session_id].iloc[0]
        assert row["credits"] == tasks.loc[tasks["session_id"] == s.session_id, "credits"].sum()
        assert row["tasks"] == len(s) and row["rank"] >= 1
    by_machine = hub.credit_tally_sync(by="machine")
    pool = hub.get_hardware_pool_sync().to_dataframe().set_index("name")
    farm_rows = by_machine[by_machine["machine"].isin(pool.index)]
    assert len(farm_rows) >= 1 and "render-node-1" in set(by_machine["machine"])  # CreditPiggy machines too
    for _, row in farm_rows.iterrows():
        assert pool.loc[row["machine"], "credits"] >= row["credits"]  # the pool counts everyone's
    board = CreditBoard(hub, by="session", refresh=None, interactive=False)
    assert board.to_dataframe()["credits"].sum() == mine["credits"].sum()
    assert f"{int(mine['credits'].max()):,}" in board.html()
    hub.close_sync()


def test_hwf_credits_magic_and_board_in_a_kernel(tmp_path):
    k = Kernel(str(tmp_path), env=dict(os.environ, HWF_NONINTERACTIVE="0"))
    try:
        k.run("%load_ext hwf_jupyter")
        k.run("cluster = %hwf_local --daemons 1")
        k.run("%%hwf_stage work\ntrue\n")
        r = k.run("sub = %hwf_dispatch --wait --repeat 4 --credits 3")
        assert r.status == "ok"
        got = k.run(
            "import json\n"
            "df = %hwf_credits --by user\n"
            "board = %hwf_credits --by user --board\n"
            "print(json.dumps({'credits': int(df['credits'].sum()), 'tasks': int(df['tasks'].sum()),"
            " 'board': int(board.to_dataframe()['credits'].sum())}))"
        ).json()
        assert got == {"credits": 12, "tasks": 4, "board": 12}
        shown = k.run("board")
        assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in shown.outputs)
        html = shown.data("text/html")
        assert html and "Credits by user" in html[0] and ">12<" in html[0]
        bad = k.run("%hwf_dispatch --credits lots", allow_error=True)
        assert "--credits takes N or MIN:MAX" in bad.stdout + bad.stderr + json.dumps(bad.outputs)
    finally:
        k.close()
