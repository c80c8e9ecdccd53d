"""The hub core's Manager-API requests (list, re-prioritise, hide, enable/disable
machines, job files) and daemons' progress reports, without sockets."""

from __future__ import annotations

from hub_server import protocol as p
from hub_server.auth import Principal
from hub_server.events import Received, Send

from test_core import HW, ALICE, BOB, CLIENT, DAEMON, OTHER, OWNER, Farm, assigned, spec

ADMIN = Principal("tok-x", "admin", "admin")
ADMIN_PEER = 4


def reply(out, peer=CLIENT):
    (msg,) = [i.msg for i in out if isinstance(i, Send) and i.peer == peer and not isinstance(i.msg, p.TaskEvent)]
    return msg


def farm(tmp_path) -> Farm:
    f = Farm(tmp_path)
    f.connect(CLIENT, ALICE)
    f.connect(OTHER, BOB)
    f.connect(DAEMON, OWNER)
    f.connect(ADMIN_PEER, ADMIN)
    return f


def test_list_tasks_filters_pages_and_keeps_users_apart(tmp_path):
    f = farm(tmp_path)
    a = f.submit(spec(label="a0"), spec(label="a1"), spec(label="a2", external_id="ext-7", job_id="job-1"))
    f.submit(spec(label="b0"), peer=OTHER)
    got = reply(f.handle(Received(CLIENT, p.ListTasks(id=1, limit=2))))
    assert got.total == 3 and [t.task_id for t in got.tasks] == a.task_ids[::-1][:2], "newest first, paged"
    assert reply(f.handle(Received(CLIENT, p.ListTasks(id=2, offset=2)))).tasks[0].task_id == a.task_ids[0]
    ext = reply(f.handle(Received(CLIENT, p.ListTasks(id=3, external_id="ext-7"))))
    assert [t.task_id for t in ext.tasks] == [a.task_ids[2]] and ext.tasks[0].job_id == "job-1"
    # the attack: alice asks for bob's tasks, by user and by session
    assert reply(f.handle(Received(CLIENT, p.ListTasks(id=4, user="bob")))).total == 0
    assert reply(f.handle(Received(OTHER, p.ListTasks(id=5, session_id=a.session_id))), peer=OTHER).total == 0
    assert reply(f.handle(Received(ADMIN_PEER, p.ListTasks(id=6))), peer=ADMIN_PEER).total == 4
    assert reply(f.handle(Received(ADMIN_PEER, p.ListTasks(id=7, user="bob"))), peer=ADMIN_PEER).total == 1


def test_priority_changes_only_while_queued_and_reorders_the_queue(tmp_path):
    f = farm(tmp_path)
    sub = f.submit(spec(), spec(), spec())
    low, mid, high = sub.task_ids
    ok = reply(f.handle(Received(CLIENT, p.UpdateTask(id=1, task_id=high, priority=50))))
    assert ok == p.Ok(id=1)
    out = f.register("d1", "i1", slots=1)
    assert [a.task_id for a in assigned(out)] == [high], "the re-prioritised task goes first"
    err = reply(f.handle(Received(CLIENT, p.UpdateTask(id=2, task_id=high, priority=1))))
    assert isinstance(err, p.Error) and err.code == "not_queued" and "only while it is queued" in err.message
    rec = reply(f.handle(Received(CLIENT, p.GetResults(id=3, task_ids=[high])))).tasks[0]
    assert rec.priority == 50
    # bob cannot touch alice's task: the unknown-id answer
    err = reply(f.handle(Received(OTHER, p.UpdateTask(id=4, task_id=low, priority=9))), peer=OTHER)
    assert isinstance(err, p.Error) and err.code == "not_found"


def test_hidden_tasks_leave_the_list_but_not_the_store(tmp_path):
    f = farm(tmp_path)
    sub = f.submit(spec(), spec())
    assert reply(f.handle(Received(CLIENT, p.UpdateTask(id=1, task_id=sub.task_ids[0], hidden=True)))) == p.Ok(id=1)
    listed = reply(f.handle(Received(CLIENT, p.ListTasks(id=2))))
    assert [t.task_id for t in listed.tasks] == [sub.task_ids[1]]
    every = reply(f.handle(Received(CLIENT, p.ListTasks(id=3, include_hidden=True))))
    assert every.total == 2 and any(t.hidden for t in every.tasks)


def test_only_an_admin_disables_machines_and_a_disabled_one_gets_no_tasks(tmp_path):
    f = farm(tmp_path)
    f.register("d1", "i1")
    err = reply(f.handle(Received(CLIENT, p.SetMachine(id=1, machine_id="d1", status="disabled"))))
    assert isinstance(err, p.Error) and err.code == "forbidden"
    assert reply(f.handle(Received(ADMIN_PEER, p.SetMachine(id=2, machine_id="d1", status="disabled"))),
                 peer=ADMIN_PEER) == p.Ok(id=2)
    sub = f.submit(spec())
    assert assigned(f.last) == []
    rec = reply(f.handle(Received(CLIENT, p.GetResults(id=3, task_ids=sub.task_ids)))).tasks[0]
    assert rec.status == "queued"
    pool = reply(f.handle(Received(CLIENT, p.GetPool(id=4))))
    assert pool.machines[0].enabled is False
    out = f.handle(Received(ADMIN_PEER, p.SetMachine(id=5, machine_id="d1", status="enabled")))
    assert [a.task_id for a in assigned(out)] == sub.task_ids
    err = reply(f.handle(Received(ADMIN_PEER, p.SetMachine(id=6, machine_id="nope", status="drain"))), peer=ADMIN_PEER)
    assert isinstance(err, p.Error) and err.code == "not_found"


def test_the_admin_switch_survives_a_restart_and_a_reconnect(tmp_path):
    f = farm(tmp_path)
    f.register("d1", "i1")
    f.handle(Received(ADMIN_PEER, p.SetMachine(id=1, machine_id="d1", status="drain")))
    f.core.store.close()
    g = Farm(tmp_path)
    g.connect(CLIENT, ALICE)
    g.connect(DAEMON, OWNER)
    g.register("d1", "i2")
    g.submit(spec())
    assert assigned(g.last) == []
    pool = reply(g.handle(Received(CLIENT, p.GetPool(id=2))))
    assert pool.machines[0].state == "draining" and not pool.machines[0].enabled


def test_progress_is_taken_only_from_the_attempts_daemon_and_inside_the_frame_range(tmp_path):
    f = farm(tmp_path)
    f.register("d1", "i1")
    sub = f.submit(spec(parser="frames", frame_start=1, frame_end=8))
    (a,) = assigned(f.last)
    watch = f.handle(Received(CLIENT, p.Watch(id=7, task_ids=sub.task_ids)))
    assert watch
    out = f.handle(Received(DAEMON, p.Progress(task_id=a.task_id, attempt=a.attempt, percent=25.0, frame_current=3)))
    events = [i.msg for i in out if isinstance(i.msg, p.TaskEvent)]
    assert events and events[0].progress == 25.0 and events[0].frame_current == 3
    # a frame outside 1..8 is not believed; another daemon's word is not taken at all
    f.handle(Received(DAEMON, p.Progress(task_id=a.task_id, attempt=a.attempt, frame_current=999)))
    f.connect(5, Principal("tok-e", "daemon", "mallory"))
    f.handle(Received(5, p.Register(id=90, name="evil", hardware=HW, slots=1, instance="e")))
    f.handle(Received(5, p.Progress(task_id=a.task_id, attempt=a.attempt, percent=99.0, frame_current=8)))
    rec = reply(f.handle(Received(CLIENT, p.GetResults(id=8, task_ids=sub.task_ids)))).tasks[0]
    assert (rec.progress, rec.frame_current, rec.frame_start, rec.frame_end, rec.parser) == (25.0, 3, 1, 8, "frames")


def test_frames_must_come_as_an_ordered_pair(tmp_path):
    f = farm(tmp_path)
    for bad, text in ((spec(frame_start=1), "together"), (spec(frame_start=5, frame_end=2), "after frame_end")):
        out = f.handle(Received(CLIENT, p.Submit(id=1, tasks=[bad])))
        err = reply(out)
        assert isinstance(err, p.Error) and text in err.message


def test_job_files_are_per_user_and_must_be_uploaded_blobs(tmp_path):
    f = farm(tmp_path)
    data = b"PK zip bytes"
    import hashlib

    sha = hashlib.sha256(data).hexdigest()
    err = reply(f.handle(Received(CLIENT, p.PutJobFile(id=1, job_id="j1", sha256=sha))))
    assert isinstance(err, p.Error) and err.code == "missing_blob"
    w = f.core.blobs.writer(sha, len(data))
    w.write(data)
    w.finish()
    f.core._grant_blob(ALICE, sha)
    assert reply(f.handle(Received(CLIENT, p.PutJobFile(id=2, job_id="j1", sha256=sha)))) == p.Ok(id=2)
    assert reply(f.handle(Received(CLIENT, p.GetJobFile(id=3, job_id="j1")))).sha256 == sha
    assert reply(f.handle(Received(OTHER, p.GetJobFile(id=4, job_id="j1"))), peer=OTHER).sha256 is None
    err = reply(f.handle(Received(OTHER, p.PutJobFile(id=5, job_id="j2", sha256=sha))), peer=OTHER)
    assert isinstance(err, p.Error) and err.code == "missing_blob", "bob cannot claim alice's blob as his job file"


def test_sessions_are_listed_per_user_with_counts(tmp_path):
    f = farm(tmp_path)
    a = f.submit(spec(), spec())
    b = f.submit(spec(), peer=OTHER)
    mine = reply(f.handle(Received(CLIENT, p.ListSessions(id=1)))).sessions
    assert [s.session_id for s in mine] == [a.session_id] and mine[0].counts == {"queued": 2}
    every = reply(f.handle(Received(ADMIN_PEER, p.ListSessions(id=2))), peer=ADMIN_PEER).sessions
    assert {s.session_id for s in every} == {a.session_id, b.session_id}


def test_a_session_watcher_gets_each_new_tasks_stage_count(tmp_path):
    f = farm(tmp_path)
    first = f.submit(spec())
    f.handle(Received(CLIENT, p.Watch(id=3, session_id=first.session_id)))
    two = p.TaskSpec(stages=[p.StageSpec(name="a", cmds=["true"]), p.StageSpec(name="b", cmds=["true"])])
    f.submit(two, session_id=first.session_id)
    events = [i.msg for i in f.last if isinstance(i.msg, p.TaskEvent)]
    assert [(e.status, e.n_stages) for e in events] == [("queued", 2)]
