"""daemon.taskdirs: a fresh private dir per attempt, gone once the task is over."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from hwf_daemon.taskdirs import TMP_NAME, TRASH_NAME, TaskDirs


def test_ended_task_dirs_go_to_a_private_trash_then_away(tmp_path: Path) -> None:
    dirs = TaskDirs(tmp_path / "w", isolated=False)
    try:
        plain = dirs.try_create("t-1.1", None)
        assert plain is not None and plain.is_dir()
        assert dirs.try_create("t-1.1", None) is None  # taken: the long way (create) clears it
        full = dirs.create("t-2.1", None)
        (full / "sub").mkdir()
        (full / "sub" / "f").write_text("x")
        (full / "link").symlink_to(tmp_path)  # never followed
        (tmp_path / "keep").write_text("outside")
        for d in (plain, full):
            assert dirs.discard(d)
            assert not d.exists()
        trash = dirs.root / TRASH_NAME
        st = os.lstat(trash)
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()
        assert len(os.listdir(trash)) == 2
        dirs.empty_trash()
        assert os.listdir(trash) == []
        assert (tmp_path / "keep").read_text() == "outside"
    finally:
        dirs.close()
    assert not (dirs.root / TRASH_NAME).exists()


def test_a_dir_as_made_is_removed_in_two_rmdirs(tmp_path: Path) -> None:
    dirs = TaskDirs(tmp_path / "w", isolated=False)
    d = dirs.create("t-3.1", None)
    assert (d / TMP_NAME).is_dir()  # every task's own TMPDIR, also as the daemon's user
    assert dirs.try_remove(d) and not d.exists()
    d = dirs.create("t-4.1", None)
    (d / "result.txt").write_text("x")
    assert not dirs.try_remove(d)  # not empty: rmtree's job
    dirs.remove(d)
    assert not d.exists()
    dirs.close()
