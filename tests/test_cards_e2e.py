"""The cards against a real LocalCluster: what they know without asking the hub again."""

from __future__ import annotations

import time

import pytest

from hwf_jupyter import Stage, Task, dispatch_sync

pytestmark = pytest.mark.e2e


def test_cluster_hub_and_submission_cards(cluster, hub):
    html = cluster._repr_html_()
    assert "HWF LocalCluster" in html and cluster.address in html
    assert "2 running of 2, 4 slots" in html
    assert "2 online" in html  # the pool wait_for_daemons saw at start
    assert f"href='{cluster.http_url}/'" in html

    assert "not fetched yet" in hub._repr_html_()
    hub.get_hardware_pool_sync()
    began = time.perf_counter()
    card = hub._repr_html_()
    assert time.perf_counter() - began < 0.5
    assert "connected" in card and "2 online" in card and "daemon-1" in card and "daemon-2" in card

    sub = dispatch_sync(Task(Stage("s", cmd="true")), hub)
    assert f"href='{cluster.http_url}/'" in sub._repr_html_() and sub.session_id in sub._repr_html_()
    results = sub.results_sync(wait=True, timeout=60)
    assert "1 finished" in sub._repr_html_()
    assert "1 finished" in results._repr_html_()
