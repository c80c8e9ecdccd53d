"""Output lines to progress (daemon/parsers.py), without processes."""

import pytest

from hwf_jupyter import __name__ as _  # noqa: F401  (the package imports)
from hwf_daemon.parsers import ProgressParser, Update


def test_blender_frames_give_the_frame_and_the_share_before_it():
    p = ProgressParser("frames", 1, 8)
    assert p.feed("Fra:1 Mem:12.00M (Peak 12.00M) | Time:00:00.01 | Syncing\n") == Update(0.0, 1)
    assert p.feed("Fra:5 Mem:1") is None, "an unfinished line waits"
    assert p.feed("2M | Rendering 3/16 samples\nnoise\n") == Update(50.0, 5)
    assert p.feed("Frame 8\n") == Update(87.5, 8)
    assert p.feed("Fra:99\n") is None, "outside the task's range: not believed"


def test_frames_without_a_range_report_the_frame_only_and_take_the_last_on_a_line():
    p = ProgressParser("frames")
    assert p.feed("frame 3/24 done; Fra:4\r") == Update(None, 4)


def test_percent_takes_the_last_valid_value_on_a_line():
    p = ProgressParser("percent")
    assert p.feed("downloading 12% ... 37.5 %\n") == Update(37.5)
    assert p.feed("1000% 250%\n") is None
    assert p.feed("progress 99.9%") is None and p.finish() == Update(99.9)


def test_hwf_progress_lines_work_with_any_parser_and_none():
    for kind in (None, "frames", "percent", "hwf-progress"):
        p = ProgressParser(kind)
        assert p.feed("hwf-progress: 3/4\n") == Update(75.0)
        assert p.feed("hwf-progress: 5/4\nhwf-progress: 1/0\n") is None


@pytest.mark.parametrize("junk", ["\x00" * 10000, "Fra:" + "9" * 5000, "%" * 100000, "hwf-progress: 99999999999999999999/1",
                                  "a" * 200000 + "\n"])
def test_garbage_never_raises_and_long_lines_are_bounded(junk):
    p = ProgressParser("frames", 1, 10)
    p.feed(junk)
    assert len(p._partial) <= 4096
    ProgressParser("percent").feed(junk)


def test_an_unknown_parser_is_refused():
    with pytest.raises(ValueError, match="unknown parser"):
        ProgressParser("magic")
