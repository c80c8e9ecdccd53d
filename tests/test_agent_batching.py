"""Results are sent in size-bounded batches (sans-I/O part of the daemon's outbox)."""

from __future__ import annotations

from daemon.agent import batch_by_size
from hub_server import protocol as p


def _done(task_id: str, text: str = "") -> p.TaskDone:
    stage = p.StageOutcome(name="s", status="finished", started=0.0, duration=1.0,
                           commands=[p.CommandOutcome(cmd="true", exit_code=0, stdout=text)])
    return p.TaskDone(id=0, task_id=task_id, attempt=1,
                      outcome=p.TaskOutcome(status="finished", stages=[stage]))


def test_small_results_share_one_batch() -> None:
    outbox = {(f"t{i}", 1): _done(f"t{i}") for i in range(50)}
    assert batch_by_size(list(outbox), outbox, limit=1 << 20) == [list(outbox)]


def test_batches_stay_under_the_message_limit_and_keep_every_result_once() -> None:
    outbox = {(f"t{i}", 1): _done(f"t{i}", "x" * 3000) for i in range(40)}
    limit = 20_000
    batches = batch_by_size(list(outbox), outbox, limit)
    assert len(batches) > 1
    assert [k for b in batches for k in b] == list(outbox)
    for b in batches:
        msg = p.TasksDone(id=1, done=[outbox[k] for k in b])
        assert len(p.encode(msg)) <= limit


def test_a_result_bigger_than_the_share_goes_alone() -> None:
    outbox = {("big", 1): _done("big", "x" * 30_000), ("small", 1): _done("small")}
    assert batch_by_size(list(outbox), outbox, limit=20_000) == [[("big", 1)], [("small", 1)]]


def test_count_cap() -> None:
    outbox = {(f"t{i}", 1): _done(f"t{i}") for i in range(25)}
    assert [len(b) for b in batch_by_size(list(outbox), outbox, 1 << 20, max_count=10)] == [10, 10, 5]
