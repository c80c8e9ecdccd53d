"""daemon/parsers.py: progress from untrusted output text, no processes."""

from __future__ import annotations

import pytest

from hwf_daemon.parsers import MAX_LINE, PARSERS, ProgressParser, Update, check_parser
from hub_server import protocol as p


def feed_all(parser: ProgressParser, *chunks: str) -> list[Update]:
    """Every update the chunks produce, in order."""
    return [u for u in (parser.feed(c) for c in chunks) if u is not None]


def test_parser_names_match_the_protocol():
    assert PARSERS == p.PARSERS


def test_unknown_parser_is_refused_naming_the_allowed_ones():
    with pytest.raises(ValueError, match="parser: 'blender' is not one of frames, percent, hwf-progress"):
        ProgressParser("blender")
    assert check_parser(None) is None
    assert check_parser("frames") == "frames"


# ------------------------------------------------------------------ frames


def test_blender_frames_with_a_range_give_frame_and_percent():
    parser = ProgressParser("frames", 1, 8)
    ups = feed_all(parser, "Fra:1 Mem:18.54M (Peak 18.54M) | Time:00:00.32 | Syncing\n",
                   "Fra:1 Mem:20M | Rendering 1 / 64 samples\n",  # same frame: no update
                   "Fra:5 Mem:20M | Time:00:01.00\n")
    assert ups == [Update(0.0, 1), Update(50.0, 5)]


def test_frames_percent_counts_the_frames_before_the_current_one():
    parser = ProgressParser("frames", 10, 13)
    assert parser.feed("Fra:12 Mem:1M\n") == Update(50.0, 12)
    assert parser.feed("Fra:13\n") == Update(75.0, 13)


def test_frames_outside_the_range_are_not_believed():
    parser = ProgressParser("frames", 10, 19)
    assert parser.feed("Fra:12\n") == Update(20.0, 12)
    assert parser.feed("Fra:3\n") is None
    assert parser.feed("Fra:500\nFra:9\n") is None
    assert parser.feed("Fra:13\nFra:99\n") == Update(30.0, 13)  # the last one in range counts


def test_a_blender_line_split_mid_number_and_sample_counts_are_not_frames():
    parser = ProgressParser("frames", 1, 8)
    assert parser.feed("Fra:5 Mem:1") is None, "an unfinished line waits"
    assert parser.feed("2M | Rendering 3/16 samples\nnoise\n") == Update(50.0, 5)
    assert parser.feed("Frame 8\n") == Update(87.5, 8)


def test_frames_without_a_range_take_the_last_on_a_line():
    assert ProgressParser("frames").feed("frame 3/24 done; Fra:4\r") == Update(None, 4)


@pytest.mark.parametrize("line, frame", [
    ("Frame 12\n", 12),
    ("frame: 7\n", 7),
    ("Rendering frame 12 of 24\n", 12),
    ("frame 3/24\n", 3),
    ("FRAME #9 done\n", 9),
])
def test_common_frame_forms(line, frame):
    assert ProgressParser("frames", 1, 100).feed(line).frame_current == frame


def test_frame_n_of_m_without_a_range_gives_percent_from_m():
    assert ProgressParser("frames").feed("frame 4/8\n") == Update(37.5, 4)
    assert ProgressParser("frames").feed("Fra:4\n") == Update(None, 4)


@pytest.mark.parametrize("line", [
    "Frames rendered: 12\n", "keyframe 4\n", "frame_start 3\n", "Fra:-5\n", "Fra:abc\n",
    "Fra:" + "9" * 40 + "\n", "Fra:2000000000\n", "frame\n",
])
def test_frame_garbage_is_ignored(line):
    parser = ProgressParser("frames", 1, 10)
    assert parser.feed(line) is None
    assert parser.update == Update(None, None)


def test_big_chunks_find_the_last_valid_match_however_far_back():
    # Read from the end in windows: a valid frame far before a run of invalid ones still counts.
    parser = ProgressParser("frames", 1, 10)
    assert parser.feed("Fra:3 Mem\n" + "Fra:99 Mem\n" * 5000) == Update(20.0, 3)
    flood = "".join(f"Fra:{i % 10 + 1} Mem:1M | Rendering {i}/4096 samples\n" for i in range(6000))
    assert parser.feed(flood) == Update(90.0, 10)  # 5999 % 10 + 1
    pct = ProgressParser("percent")
    assert pct.feed("7%\n" + "noise 500%\n" * 3000) == Update(7.0, None)
    assert ProgressParser(None).feed("hwf-progress: 1/8\n" + "y" * 3000 + "\n" * 9) == Update(12.5, None)


def test_the_last_frame_of_a_chunk_wins():
    parser = ProgressParser("frames", 1, 10)
    assert parser.feed("Fra:1\nFra:2\nFra:3\nnoise\n") == Update(20.0, 3)


# ------------------------------------------------------------------ percent


@pytest.mark.parametrize("line, value", [
    ("progress 45%\n", 45.0),
    ("[#####     ] 45.5 %\n", 45.5),
    ("10% ... 20% ... 30%\n", 30.0),
    ("100%\n", 100.0),
    ("0%\n", 0.0),
])
def test_percent_takes_the_last_on_the_line(line, value):
    assert ProgressParser("percent").feed(line) == Update(value, None)


@pytest.mark.parametrize("line", ["-5%\n", "150%\n", "1.2.3%\n", "x5%\n", "9" * 30 + "%\n", "50 percent\n"])
def test_percent_garbage_is_ignored(line):
    parser = ProgressParser("percent")
    assert parser.feed(line) is None


def test_percent_progress_bars_redrawn_with_carriage_returns():
    parser = ProgressParser("percent")
    assert parser.feed("\r 10%\r 20%\r 3") == Update(20.0, None)
    assert parser.feed("0%\r") == Update(30.0, None)


def test_percent_parser_ignores_frames_and_frames_parser_ignores_percents():
    assert ProgressParser("percent").feed("Fra:3\n") is None
    assert ProgressParser("frames", 1, 10).feed("50%\n") is None


# ------------------------------------------------------------------ hwf-progress


@pytest.mark.parametrize("parser", [None, *PARSERS])
def test_hwf_progress_lines_count_with_any_parser(parser):
    assert ProgressParser(parser).feed("hwf-progress: 3/4\n").percent == 75.0


@pytest.mark.parametrize("line", [
    "hwf-progress: 5/4\n", "hwf-progress: 1/0\n", "hwf-progress: -1/4\n", "hwf-progress: a/b\n",
    "hwf-progress: 1/" + "9" * 5000 + "\n", "no-hwf-progress 3/4\n",
])
def test_hwf_progress_garbage_is_ignored(line):
    assert ProgressParser(None).feed(line) is None


def test_no_parser_ignores_frames_and_percents():
    parser = ProgressParser(None)
    assert parser.feed("Fra:3\n50%\nframe 2/4\n") is None


def test_later_line_wins_between_frames_and_hwf_progress():
    parser = ProgressParser("frames", 1, 4)
    assert parser.feed("Fra:2\nhwf-progress: 9/10\n") == Update(90.0, 2)
    assert parser.feed("hwf-progress: 1/10\nFra:3\n") == Update(50.0, 3)


# ------------------------------------------------------------------ chunks and lines


def test_split_line_gives_the_whole_number():
    parser = ProgressParser("frames", 1, 20)
    assert parser.feed("Fr") is None
    assert parser.feed("a:1") is None
    assert parser.feed("2 Mem\n") == Update(55.0, 12)


def test_streams_keep_their_own_unfinished_lines():
    parser = ProgressParser(None)
    assert parser.feed("hwf-progr", "stdout") is None
    assert parser.feed("garbage\n", "stderr") is None
    assert parser.feed("ess: 1/2\n", "stdout") == Update(50.0, None)


def test_finish_reads_the_last_line_without_a_newline():
    parser = ProgressParser(None)
    assert parser.feed("hwf-progress: 1/4\nhwf-progress: 2/4") == Update(25.0, None)
    assert parser.finish() == Update(50.0, None)
    assert parser.finish() is None


def test_an_endless_line_keeps_bounded_memory_and_is_still_read():
    parser = ProgressParser("percent")
    assert parser.feed("x" * (MAX_LINE - 10)) is None
    assert parser.feed(" 42%" + "y" * 100) == Update(42.0, None)  # over MAX_LINE: read now
    assert all(len(v) <= MAX_LINE for v in parser._partial.values())
    parser.feed("z" * (10 * MAX_LINE))
    assert all(len(v) <= MAX_LINE for v in parser._partial.values())


@pytest.mark.parametrize("junk", ["\x00" * 10000, "Fra:" + "9" * 5000, "%" * 100000,
                                  "hwf-progress: 99999999999999999999/1", "a" * 200000 + "\n"])
def test_floods_of_garbage_never_raise_and_keep_lines_bounded(junk):
    for parser_name in (None, *PARSERS):
        parser = ProgressParser(parser_name, 1, 10)
        assert parser.feed(junk) is None and parser.finish() is None
        assert all(len(v) <= MAX_LINE for v in parser._partial.values())


def test_binary_garbage_never_raises():
    parser = ProgressParser("frames", 1, 10)
    junk = "".join(chr(c) for c in range(0, 0x3000, 7)) + "Fra:\x00 %%% hwf-progress: / \n"
    for parser_name in (None, *PARSERS):
        parser = ProgressParser(parser_name, 1, 10)
        parser.feed(junk)
        parser.finish()
        assert parser.update == Update(None, None)
