"""Hardware requirement parsing and matching (DESIGN.md rules)."""

import pytest

from hub_server import hardware as hw

LINUX_BOX = {
    "os": "linux", "distro": "Ubuntu 22.04.3 LTS", "arch": "x86_64",
    "cpu": "AMD Ryzen 9 5950X 16-Core Processor", "cores": 32,
    "ram": int(15.5 * 2**30), "gpus": [{"name": "NVIDIA GeForce RTX 3090", "memory": 24 * 2**30}],
    "name": "box1", "machine_id": "box1", "tags": ["fast", "cuda"],
}
MAC = {"os": "darwin", "distro": "macOS 14.2", "arch": "arm64", "cpu": "Apple M2", "cores": 8,
       "ram": 8 * 2**30, "gpus": [], "name": "mac", "machine_id": "mac", "tags": []}


def m(req, machine):
    return hw.matches(hw.normalize(req), machine)


@pytest.mark.parametrize("value,expected", [
    ("16GB", 16 * 2**30), ("512MB", 512 * 2**20), ("1.5 GiB", int(1.5 * 2**30)),
    (1024, 1024), ("2g", 2 * 2**30), ("100", 100),
])
def test_parse_size(value, expected):
    assert hw.parse_size(value) == expected


@pytest.mark.parametrize("bad", ["lots", "16 parsecs", "-3GB", True, [], "GB"])
def test_parse_size_refuses(bad):
    with pytest.raises(hw.HardwareError, match="ram"):
        hw.parse_size(bad)


def test_unknown_key_named():
    with pytest.raises(hw.HardwareError, match="unknown hardware key 'gpuu'"):
        hw.normalize({"gpuu": "any"})


def test_any_is_dropped_and_case_ignored():
    assert hw.normalize({"os": "any", "cpu": "ANY", "gpu": "Any", "ram": "any"}) == {}
    assert hw.normalize({"OS": "Linux"}) == {"os": "linux"}


def test_os_family_and_distro():
    assert m({"os": "linux"}, LINUX_BOX) and not m({"os": "linux"}, MAC)
    assert m({"os": "macos"}, MAC) and m({"os": "darwin"}, MAC)
    assert m({"os": "ubuntu"}, LINUX_BOX) and not m({"os": "debian"}, LINUX_BOX)
    assert not m({"os": "windows"}, LINUX_BOX)


def test_cpu_arch_aliases_and_model():
    assert m({"cpu": "amd64"}, LINUX_BOX) and m({"cpu": "x86_64"}, LINUX_BOX)
    assert m({"cpu": "aarch64"}, MAC) and m({"cpu": "arm64"}, MAC)
    assert not m({"cpu": "arm64"}, LINUX_BOX)
    assert m({"cpu": "ryzen"}, LINUX_BOX) and not m({"cpu": "xeon"}, LINUX_BOX)


def test_gpu():
    assert m({"gpu": "none"}, MAC) and not m({"gpu": "none"}, LINUX_BOX)
    assert m({"gpu": "rtx 3090"}, LINUX_BOX) and not m({"gpu": "a100"}, LINUX_BOX)
    assert not m({"gpu": "rtx"}, MAC)


def test_ram_tolerance_16gb_machine_showing_15_5_gib():
    assert m({"ram": "16GB"}, LINUX_BOX)
    assert not m({"ram": "32GB"}, LINUX_BOX)
    assert m({"ram": "512MB"}, MAC)


def test_cores_tags_daemon():
    assert m({"cores": 16}, LINUX_BOX) and not m({"cores": 16}, MAC)
    assert m({"tags": ["fast"]}, LINUX_BOX) and m({"tags": "fast,cuda"}, LINUX_BOX)
    assert not m({"tags": ["fast", "big"]}, LINUX_BOX)
    assert m({"daemon": "mac"}, MAC) and not m({"daemon": "mac"}, LINUX_BOX)


@pytest.mark.parametrize("req,err", [
    ({"cores": "many"}, "cores"), ({"cores": 0}, "cores"), ({"tags": 5}, "tags"),
    ({"os": 3}, "os"), ("linux", "dict"),
])
def test_bad_values_named(req, err):
    with pytest.raises(hw.HardwareError, match=err):
        hw.normalize(req)


def test_mismatches_lists_failing_keys():
    assert hw.mismatches(hw.normalize({"os": "linux", "gpu": "a100", "cores": 4}), LINUX_BOX) == ["gpu"]
