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


def test_a_slots_private_tmp_is_emptied_between_tasks_but_keeps_its_mountpoint(tmp_path: Path) -> None:
    """The slot's /tmp outlives its tasks (its namespace is kept): emptied,
    mode and owner reset, links not followed, the root's mountpoint kept."""
    from hwf_daemon.accounts import TaskUser

    me = TaskUser(uid=os.getuid(), gid=os.getgid(), name="me", per_slot=True)
    dirs = TaskDirs(tmp_path / "work", isolated=False)
    tmp = dirs.slot_tmp(0, me)
    assert dirs.slot_tmp(0, me) == tmp and stat.S_IMODE(tmp.stat().st_mode) == 0o700
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    (tmp / "left.txt").write_text("secret")
    (tmp / "deep" / "er").mkdir(parents=True)
    (tmp / "link").symlink_to(outside)
    (tmp / "mnt").mkdir()  # root-owned here when the suite runs as root, as the daemon makes it
    tmp.chmod(0o777)
    dirs.empty(tmp, me, keep="mnt")
    left = sorted(p.name for p in tmp.iterdir())
    assert left == (["mnt"] if os.geteuid() == 0 else [])
    assert outside.read_text() == "keep me" and stat.S_IMODE(tmp.stat().st_mode) == 0o700
    (tmp / "from-a-dead-daemon").write_text("x")
    again = TaskDirs(tmp_path / "work", isolated=False)  # a new daemon on the same workdir
    assert again.slot_tmp(0, me) == tmp and not (tmp / "from-a-dead-daemon").exists()
    assert dirs.mountpoint_in_slot_tmp(("/var/nowhere",)) is None
    assert dirs.mountpoint_in_slot_tmp(("/var/nowhere", str(tmp_path / "work"))) == "tasks"
    assert dirs.mountpoint_in_slot_tmp((str(tmp_path),)) == "work"
