"""daemon.hardware, daemon.gpu and daemon.load on this (GPU-less) machine."""

from __future__ import annotations

import shutil

import pytest

from hwf_daemon.gpu import GpuSampler, list_gpus, parse_gpu_list_csv, parse_gpu_usage_csv
from hwf_daemon.hardware import _cpu_model_from_cpuinfo, _os_release_pretty_name, detect_hardware
from hwf_daemon.load import sample_load
from hub_server import hardware as hub_hardware
from hub_server.protocol import Load

HAS_GPU = bool(list_gpus())


def test_detect_hardware_keys_and_types() -> None:
    hw = detect_hardware()
    expected = {
        "os": str,
        "distro": str,
        "os_version": str,
        "arch": str,
        "cpu": str,
        "cores": int,
        "physical_cores": int,
        "ram": int,
        "gpus": list,
        "hostname": str,
        "python": str,
    }
    assert set(hw) == set(expected)
    for key, typ in expected.items():
        assert isinstance(hw[key], typ), key
    assert hw["os"] in ("linux", "windows", "darwin")
    assert hw["os"] == hw["os"].lower() and hw["arch"] == hw["arch"].lower()
    assert hw["cores"] >= hw["physical_cores"] >= 1
    assert hw["ram"] > 2**27
    assert hw["distro"] and hw["cpu"]
    for gpu in hw["gpus"]:
        assert isinstance(gpu["name"], str) and isinstance(gpu["memory"], int)
        assert isinstance(gpu["index"], int)
    # The scheduler can match on it.
    assert hub_hardware.matches(hub_hardware.normalize({"os": hw["os"], "cores": 1}), hw)


def test_os_release_and_cpuinfo_parsing() -> None:
    release = 'NAME="Debian GNU/Linux"\nPRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\n'
    assert _os_release_pretty_name(release) == "Debian GNU/Linux 12 (bookworm)"
    assert _os_release_pretty_name("ID=alpine\n") is None
    x86 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\nprocessor\t: 1\n"
    assert _cpu_model_from_cpuinfo(x86) == "AMD EPYC 7B13"
    arm = "processor\t: 0\nBogoMIPS\t: 108.00\n\nHardware\t: BCM2835\nModel\t: Raspberry Pi 4\n"
    assert _cpu_model_from_cpuinfo(arm) == "BCM2835"
    assert _cpu_model_from_cpuinfo("processor\t: 0\n") is None


SMI_LIST = """\
0, NVIDIA GeForce RTX 3090, 24576
1, NVIDIA A100-SXM4-80GB, 81920
2, Weird, Name, With Commas, [N/A]
nonsense line
"""

SMI_USAGE = """\
0, 35, 1024
1, [Not Supported], 2048
2, 100, [N/A]
"""


def test_parse_nvidia_smi_gpu_list() -> None:
    assert parse_gpu_list_csv(SMI_LIST) == [
        {"name": "NVIDIA GeForce RTX 3090", "memory": 24576 * 2**20, "index": 0},
        {"name": "NVIDIA A100-SXM4-80GB", "memory": 81920 * 2**20, "index": 1},
        {"name": "Weird, Name, With Commas", "memory": 0, "index": 2},
    ]
    # Output with units and a header (without "nounits"/"noheader") parses too.
    with_units = "index, name, memory.total [MiB]\n0, Tesla T4, 15360 MiB\n"
    assert parse_gpu_list_csv(with_units) == [
        {"name": "Tesla T4", "memory": 15360 * 2**20, "index": 0}
    ]
    assert parse_gpu_list_csv("") == []
    assert parse_gpu_list_csv("NVIDIA-SMI has failed because it couldn't communicate") == []


def test_parse_nvidia_smi_usage() -> None:
    assert parse_gpu_usage_csv(SMI_USAGE) == [
        (35.0, 1024 * 2**20),
        (None, 2048 * 2**20),
        (100.0, None),
    ]


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU")
def test_no_gpu_is_clean() -> None:
    assert list_gpus() == []
    sampler = GpuSampler(interval=0.01)
    with sampler:
        pass
    assert sampler.available is False
    assert sampler.stop() == (None, None)
    assert sampler.max_util is None and sampler.max_mem is None


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="nvidia-smi present")
def test_without_nvidia_smi_or_nvml_there_are_no_gpus() -> None:
    try:
        import pynvml  # noqa: F401
    except ImportError:
        assert list_gpus() == [] and detect_hardware()["gpus"] == []
    else:
        pytest.skip("pynvml installed")


def test_sample_load(tmp_path) -> None:
    load = sample_load(tmp_path)
    assert isinstance(load, Load)
    assert len(load.load_avg) == 3 and all(x >= 0 for x in load.load_avg)
    for value in (load.cpu_percent, load.mem_percent, load.disk_percent):
        assert 0.0 <= value <= 100.0
    assert load.mem_percent > 0 and load.disk_percent > 0
