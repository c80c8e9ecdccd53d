"""daemon/progress.py: throttled progress messages, on an event loop without processes."""

from __future__ import annotations

import asyncio

import pytest

from hwf_daemon.parsers import ProgressParser, Update
from hwf_daemon.progress import ProgressReporter, fan_out


class Recorder:
    """Stands in for the link: records each update with the loop time it was sent."""

    def __init__(self, delay: float = 0.0) -> None:
        self.sent: list[tuple[float, Update]] = []
        self.delay = delay
        self.active = 0
        self.max_active = 0

    async def __call__(self, update: Update) -> None:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            self.sent.append((asyncio.get_running_loop().time(), update))
        finally:
            self.active -= 1


def run(coro):
    return asyncio.run(coro)


def test_a_flood_of_frames_sends_few_messages_the_latest_last():
    async def main():
        rec = Recorder()
        rep = ProgressReporter(ProgressParser("frames", 1, 1000), rec, interval=0.05)
        start = asyncio.get_running_loop().time()
        for frame in range(1, 1001):
            rep("stdout", f"Fra:{frame} Mem:1M\n")
            if frame % 100 == 0:
                await asyncio.sleep(0.01)
        elapsed = asyncio.get_running_loop().time() - start
        await rep.close()
        return rec, elapsed

    rec, elapsed = run(main())
    frames = [u.frame_current for _, u in rec.sent]
    assert frames[-1] == 1000  # the final value is never lost
    assert rec.sent[-1][1].percent == pytest.approx(99.9)
    assert frames == sorted(frames)
    # At most one per interval (+ the first at once and the last on close).
    assert len(rec.sent) <= elapsed / 0.05 + 2
    assert len(rec.sent) < 20


def test_messages_are_spaced_by_the_interval():
    async def main():
        rec = Recorder()
        rep = ProgressReporter(ProgressParser(None), rec, interval=0.05)
        for i in range(1, 31):
            rep("stdout", f"hwf-progress: {i}/30\n")
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.06)  # the timer sends the latest without close()
        last_before_close = rec.sent[-1][1]
        await rep.close()
        return rec, last_before_close

    rec, last_before_close = run(main())
    assert last_before_close.percent == 100.0
    times = [t for t, _ in rec.sent]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert gaps and min(gaps) >= 0.045
    assert len(rec.sent) >= 2  # progress went out while the "task" ran, not only at the end


def test_one_send_in_flight_at_most():
    async def main():
        rec = Recorder(delay=0.03)
        rep = ProgressReporter(ProgressParser("percent"), rec, interval=0.0)
        for i in range(50):
            rep("stdout", f"{i}%\n")
            await asyncio.sleep(0.002)
        await rep.close()
        return rec

    rec = run(main())
    assert rec.max_active == 1
    assert rec.sent[-1][1] == Update(49.0, None)


def test_close_sends_the_last_unfinished_line():
    async def main():
        rec = Recorder()
        rep = ProgressReporter(ProgressParser(None), rec, interval=10.0)
        rep("stdout", "hwf-progress: 1/4\n")
        rep("stdout", "hwf-progress: 3/4")  # no newline: read only at the end
        await asyncio.sleep(0.01)
        await rep.close()
        rep("stdout", "hwf-progress: 4/4\n")  # after close: ignored
        return rec

    rec = run(main())
    assert [u.percent for _, u in rec.sent] == [25.0, 75.0]


def test_output_without_progress_sends_nothing():
    async def main():
        rec = Recorder()
        rep = ProgressReporter(ProgressParser(None), rec)
        rep("stdout", "hello 50%\nFra:3\n")
        rep("stderr", "warning\n")
        await rep.close()
        return rec

    assert run(main()).sent == []


def test_a_failing_send_does_not_break_the_reporter():
    async def main():
        calls = []

        async def send(update: Update) -> None:
            calls.append(update)
            raise ConnectionError("link down")

        rep = ProgressReporter(ProgressParser(None), send, interval=0.0)
        rep("stdout", "hwf-progress: 1/2\n")
        await asyncio.sleep(0.01)
        rep("stdout", "hwf-progress: 2/2\n")
        await rep.close()
        return calls, rep.sent

    calls, sent = run(main())
    assert [u.percent for u in calls] == [50.0, 100.0]
    assert sent == 0


def test_fan_out_feeds_every_consumer_and_survives_a_broken_one():
    seen: list[tuple[str, str]] = []

    def broken(stream: str, text: str) -> None:
        raise RuntimeError("viewer bug")

    out = fan_out(None, broken, lambda s, t: seen.append((s, t)))
    assert out is not None
    out("stdout", "x")
    assert seen == [("stdout", "x")]
    assert fan_out(None, None) is None
    only = lambda s, t: None  # noqa: E731
    assert fan_out(None, only) is only
