"""The engine process's queue-time bookkeeping: measured at a request's first step, reported on
its first output, forgotten after it."""

from __future__ import annotations

from types import SimpleNamespace

from engine_core.process import QueueTimes
from ipc.messages import EngineCoreOutput, FinishReason


def running(*request_ids: str) -> list:
    return [SimpleNamespace(request_id=r) for r in request_ids]


def test_queue_time_is_measured_at_the_first_step_and_reported_on_the_first_output(monkeypatch):
    clock = iter([100.0, 101.0, 102.0])
    monkeypatch.setattr("engine_core.process.time.time", lambda: next(clock))
    times = QueueTimes()
    times.arrived("chunked")  # t=100
    times.arrived("waits")  # t=101
    times.arrived("aborted")  # t=102
    times.after_step(103.5, running("chunked"), [])  # first prefill chunk, no output yet
    times.after_step(104.0, running("chunked"), [])
    first = EngineCoreOutput("chunked", 0, [7])
    times.after_step(105.0, running("chunked", "waits"), [first])  # scheduled and sampled together
    assert first.queue_time_s == 3.5
    later = EngineCoreOutput("chunked", 0, [8])
    waits = EngineCoreOutput("waits", 0, [9])
    times.after_step(106.0, running("chunked", "waits"), [later, waits])
    assert later.queue_time_s is None and waits.queue_time_s == 4.0
    aborted = EngineCoreOutput("aborted", 0, [], finish_reason=FinishReason.ABORT)
    times.after_step(107.0, running("chunked", "waits"), [aborted])  # never ran: no queue time
    assert aborted.queue_time_s is None
    assert len(times) == 0


def test_a_request_done_in_its_first_step_still_gets_its_queue_time(monkeypatch):
    monkeypatch.setattr("engine_core.process.time.time", lambda: 10.0)
    times = QueueTimes()
    times.arrived("short")
    done = EngineCoreOutput("short", 0, [3], finish_reason=FinishReason.LENGTH)
    times.after_step(12.0, running(), [done])  # finished, so no longer running after the step
    assert done.queue_time_s == 2.0 and len(times) == 0
