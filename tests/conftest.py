"""Shared fixtures: real hubs and daemons as separate processes on 127.0.0.1."""

from __future__ import annotations

import os

import pytest

from hwf_jupyter import LocalCluster


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """One hub + 2 daemons (2 slots each) shared by tests that do not disturb it."""
    root = tmp_path_factory.mktemp("cluster")
    with LocalCluster(daemons=2, slots=2, state_dir=root) as c:
        yield c


@pytest.fixture
def hub(cluster, tmp_path):
    h = cluster.hub(artifacts_dir=tmp_path / "hwf_artifacts")
    yield h
    h.close_sync()


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def pytest_configure(config):
    os.environ.setdefault("HWF_NONINTERACTIVE", "1")
