"""Shared fixtures: real hubs and daemons as separate processes on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

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
    # %hwf_local's farm outlives kernels: kernels the tests start (nbclient,
    # JupyterLab) keep theirs in a temporary dir, stopped when the run ends.
    if "HWF_LOCAL_DIR" not in os.environ:
        config._hwf_local_dir = tempfile.mkdtemp(prefix="hwf-test-local-")
        os.environ["HWF_LOCAL_DIR"] = config._hwf_local_dir


def pytest_unconfigure(config):
    local_dir = getattr(config, "_hwf_local_dir", None)
    if local_dir:
        from hwf_jupyter import localfarm

        localfarm.stop_farm(Path(local_dir))
        shutil.rmtree(local_dir, ignore_errors=True)


# Modules whose every test starts processes (hubs, daemons, kernels, shells).
E2E_MODULES = {"test_e2e_bad_input", "test_e2e_core", "test_e2e_hub_ops", "test_faults", "test_grid",
               "test_kernel_magics", "test_notebooks", "test_processes", "test_runner", "test_trust",
               "test_daemon_trust", "test_e2e_python", "test_pyworkers", "test_isolation"}
# Fixtures that start processes.
E2E_FIXTURES = {"cluster", "hub", "farm"}


def pytest_collection_modifyitems(config, items):
    """Mark every test that starts a process ``e2e``, so ``-m "not e2e"`` is a
    seconds-long inner loop of the sans-I/O tests."""
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if module in E2E_MODULES or E2E_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)
