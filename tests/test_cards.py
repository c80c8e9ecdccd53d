"""HTML cards (Dask-like) for Hub, Submission and ResultList: no network, everything escaped."""

from __future__ import annotations

import time

from hub_server import protocol as p
from hwf_jupyter import Hub
from hwf_jupyter.cards import pool_section, status_counts_html
from hwf_jupyter.dispatch import Submission
from hwf_jupyter.results import HardwarePool, ResultList

GIB = 2**30
EVIL = "<script>alert('x')</script>"


def pool(*names: str, state: str = "online") -> HardwarePool:
    return HardwarePool.from_machines([
        p.MachineInfo(machine_id=f"m-{i}", name=n, state=state, slots=2, running=i % 2,
                      hardware={"cores": 8, "ram": 16 * GIB, "gpus": [{"name": "A100"}] if i == 0 else []})
        for i, n in enumerate(names)])


def test_a_disconnected_hub_card_does_not_touch_the_network() -> None:
    hub = Hub("127.0.0.1:9", connect_timeout=30)  # nothing listens there; a connect would fail or hang
    began = time.perf_counter()
    html = hub._repr_html_()
    assert time.perf_counter() - began < 0.5
    assert hub._link is None  # no connection was attempted
    assert "not connected" in html and "ws://127.0.0.1:9" in html
    assert "hub.get_hardware_pool()" in html and "status page" not in html


def test_hub_card_shows_workers_slots_and_memory_from_the_cached_pool() -> None:
    hub = Hub("127.0.0.1:9")
    machines = HardwarePool(list(pool("gpu-node-1", EVIL)) + list(pool("old-box", state="offline")))
    hub._pool_cache = (machines, time.time() - 30)
    html = hub._repr_html_()
    assert "2 online (1 draining or offline)" in html
    assert "4 (1 running)" in html  # slots of online machines
    assert "32.0 GB" in html and "16" in html  # memory and cores summed over the online ones
    assert "30s ago" in html and "Machines (3)" in html and "GPUs" in html
    assert "gpu-node-1" in html and "white-space:nowrap" in html
    assert EVIL not in html and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html


def test_pool_card_caps_the_machine_list() -> None:
    rows, sections = pool_section(pool(*[f"n{i}" for i in range(30)]), fetched=100.0, now=100.0)
    assert dict(rows)["workers"] == "30 online"
    [(summary, body)] = sections
    assert summary == "Machines (30)" and "… 18 more" in body and "n11" in body and "n12<" not in body


class _StubHub:
    """Only what Submission uses; get_result_sync answers from records."""

    url = "ws://127.0.0.1:1"
    status_url = "http://127.0.0.1:2/"

    def __init__(self, records):
        self.records = records

    def get_result_sync(self, ids, wait=True, timeout=None):
        return ResultList.from_records(self.records)


def test_submission_card_before_and_after_a_fetch() -> None:
    recs = [p.TaskRecord(task_id=f"t-{i:016x}", session_id="s-abc", status=s)
            for i, s in enumerate(["finished", "failed", "running"])]
    sub = Submission([r.task_id for r in recs], "s-abc<b>", _StubHub(recs))
    html = sub._repr_html_()
    assert "HWF Submission" in html and "s-abc&lt;b&gt;" in html and "s-abc<b>" not in html
    assert "sub.results_sync(wait=False)" in html  # unknown status: says how to get it
    assert "href='http://127.0.0.1:2/'" in html and "t-00000000…" in html
    sub.results_sync(wait=False)
    html = sub._repr_html_()
    assert sub.counts == {"running": 1, "finished": 1, "failed": 1}
    assert "1 running" in html and "1 finished" in html and "1 failed" in html


def test_status_counts_escape_unknown_statuses() -> None:
    html = status_counts_html({"finished": 2, EVIL: 1})
    assert "#2e7d32" in html and EVIL not in html and "&lt;script&gt;" in html


def finished(i: int, machine: str, status: str = "finished", error=None) -> p.TaskRecord:
    return p.TaskRecord(task_id=f"t-{i:016x}", session_id="s", status=status, machine=machine,
                        started=100.0 + i, finished=101.0 + i, error=error, label=f"job {i}",
                        exit_code=0 if status == "finished" else 1)


def test_result_list_card_summarises_then_shows_the_first_tasks() -> None:
    recs = [finished(i, "node-a") for i in range(11)] + [finished(11, EVIL, "failed", error=f"boom {EVIL}\nmore")]
    html = ResultList.from_records(recs)._repr_html_()
    assert "HWF results" in html and "11 finished" in html and "1 failed" in html
    assert "12.00s from the first start to the last end" in html
    assert "first error" in html and "boom &lt;script&gt;" in html and "more" not in html.split("first error")[1][:200]
    assert "Tasks (12)" in html and "… 2 more" in html and "t-00000000…" in html
    assert EVIL not in html and "<script" not in html


def test_empty_result_list_card() -> None:
    html = ResultList()._repr_html_()
    assert "HWF results" in html and "Tasks (" not in html


def test_hardware_pool_card_and_a_card_title_and_link_escape() -> None:
    from hwf_jupyter.cards import card, esc

    html = pool("a-node", EVIL)._repr_html_()
    assert "HWF hardware pool" in html and "2 online" in html and "<details open>" in html
    assert "a-node" in html and EVIL not in html
    html = card(EVIL, [("address", esc(EVIL))], status_url="http://127.0.0.1:1/?a='b'")
    assert EVIL not in html and "href='http://127.0.0.1:1/?a=&#x27;b&#x27;'" in html
