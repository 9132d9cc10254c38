"""Queue times, stamped by the scheduler: from a request's arrival in the engine to the first step
that runs it, reported on the request's first output and never again."""

from __future__ import annotations

import pytest

from engine_helpers import tiny_core, tiny_request, write_tiny_model
from ipc.messages import FinishReason


class Clock:
    def __init__(self, now_s: float) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


def test_queue_time_is_measured_at_the_first_step_and_reported_on_the_first_output(model_dir):
    # one running sequence at a time, prompts in chunks of 16 tokens
    core = tiny_core(model_dir, max_num_seqs=1, max_num_batched_tokens=16)
    clock = core.scheduler.clock = Clock(100.0)
    core.add_request(tiny_request("chunked", list(range(4, 44)), max_tokens=2, ignore_eos=True))
    clock.now_s = 101.0
    core.add_request(tiny_request("waits", [4, 5, 6], max_tokens=1, ignore_eos=True))
    clock.now_s = 102.0
    core.add_request(tiny_request("aborted", [4, 5, 6], max_tokens=1, ignore_eos=True))
    clock.now_s = 103.5
    assert core.step() == []  # the first 16 of the prompt's 40 tokens: no output yet
    clock.now_s = 104.0
    assert core.step() == []
    clock.now_s = 105.0
    (first,) = core.step()  # the prompt's last chunk, and its first token
    assert first.request_id == "chunked" and first.queue_time_s == 3.5
    clock.now_s = 106.0
    (later,) = core.step()
    assert later.finish_reason == FinishReason.LENGTH and later.queue_time_s is None
    core.abort_requests(["aborted"])  # never ran: no queue time
    clock.now_s = 107.0
    aborted, waits = core.step()
    assert aborted.finish_reason == FinishReason.ABORT and aborted.queue_time_s is None
    assert waits.request_id == "waits" and waits.queue_time_s == 6.0
    assert not core.requests and not core.has_unfinished_requests


def test_a_request_done_in_its_first_step_still_gets_its_queue_time(model_dir):
    core = tiny_core(model_dir)
    clock = core.scheduler.clock = Clock(10.0)
    core.add_request(tiny_request("short", [4, 5, 6], max_tokens=1, ignore_eos=True))
    clock.now_s = 12.0
    (done,) = core.step()
    assert done.finish_reason == FinishReason.LENGTH and done.queue_time_s == 2.0
    assert not core.requests
