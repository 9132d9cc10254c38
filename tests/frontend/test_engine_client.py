"""EngineClient against a fake engine made of real ZeroMQ sockets (no model)."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
import zmq
import zmq.asyncio

from frontend.engine_client import EngineClient, EngineDeadError, ServerStoppingError
from frontend.config import FrontendConfig
from ipc.config import EngineConfig
from ipc.messages import (
    EngineCoreAbort,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineDead,
    EngineReady,
    FinishReason,
    SamplingParams,
    SchedulerStats,
    decode_to_engine,
    encode,
)
from ipc.sockets import ipc_addresses, make_socket

pytestmark = pytest.mark.anyio

READY = EngineReady("m", 256, 1000, num_kv_blocks=8, block_size=16)
STATS = SchedulerStats(num_running=1, num_waiting=0, kv_cache_usage=0.25, num_preemptions=0, num_prompt_tokens_computed=3)
TIMEOUT_S = 5.0  # a bound on waiting for an event that should come at once, not a delay


class FakeEngineSockets:
    """The engine's side of the pipes: binds both, reads requests, sends scripted messages."""

    def __init__(self, config: FrontendConfig) -> None:
        self.ctx = zmq.asyncio.Context()
        self.input = make_socket(self.ctx, zmq.PULL, config.engine.input_address, bind=True)
        self.output = make_socket(self.ctx, zmq.PUSH, config.engine.output_address, bind=True)

    async def receive(self):
        return decode_to_engine(await asyncio.wait_for(self.input.recv(), TIMEOUT_S))

    async def send(self, message) -> None:
        await self.output.send(encode(message))

    async def send_outputs(self, *outputs: EngineCoreOutput) -> None:
        await self.send(EngineCoreOutputs(list(outputs), STATS, timestamp=0.0))

    def close(self) -> None:
        self.ctx.destroy(linger=0)


@pytest.fixture
def config(tmp_path) -> FrontendConfig:
    input_address, output_address = ipc_addresses(str(tmp_path))
    return FrontendConfig(engine=EngineConfig(model="m", served_model_name="m", input_address=input_address,
                                              output_address=output_address))


@pytest.fixture
async def engine(config):
    sockets = FakeEngineSockets(config)
    yield sockets
    sockets.close()


@pytest.fixture
async def client(config, engine):
    engine_client = EngineClient(config)
    await engine_client.start()
    yield engine_client
    await engine_client.shutdown()


def make_request(request_id: str, n: int = 1) -> EngineCoreRequest:
    return EngineCoreRequest(request_id, [1, 2, 3], SamplingParams(max_tokens=4, n=n), [0], arrival_time=0.0)


async def collect(client: EngineClient, request: EngineCoreRequest) -> list[EngineCoreOutput]:
    return [output async for output in client.generate([request])]


async def test_ready_message_makes_the_client_ready(client, engine):
    assert not client.is_ready and client.model_info is None
    await engine.send(READY)
    assert await asyncio.wait_for(client.wait_ready(), TIMEOUT_S) == READY
    assert client.is_ready and client.model_info == READY and not client.is_dead


async def test_generate_sends_the_request_and_routes_outputs_by_request(client, engine):
    task_a = asyncio.create_task(collect(client, make_request("a")))
    task_b = asyncio.create_task(collect(client, make_request("b", n=2)))
    received = {(await engine.receive()).request_id, (await engine.receive()).request_id}
    assert received == {"a", "b"}
    await engine.send_outputs(
        EngineCoreOutput("b", 0, [5]),
        EngineCoreOutput("a", 0, [7]),
        EngineCoreOutput("unknown", 0, [9], finish_reason=FinishReason.STOP),  # dropped
        EngineCoreOutput("b", 1, [6], finish_reason=FinishReason.LENGTH),
    )
    await engine.send_outputs(
        EngineCoreOutput("a", 0, [8], finish_reason=FinishReason.STOP, stop_reason=0),
        EngineCoreOutput("b", 0, [4], finish_reason=FinishReason.LENGTH),
    )
    outputs_a = await asyncio.wait_for(task_a, TIMEOUT_S)
    outputs_b = await asyncio.wait_for(task_b, TIMEOUT_S)
    assert [o.new_token_ids for o in outputs_a] == [[7], [8]]
    assert [(o.index, o.new_token_ids) for o in outputs_b] == [(0, [5]), (1, [6]), (0, [4])]
    assert client.latest_stats == STATS


async def test_one_stream_carries_every_prompt_and_ends_without_the_sequences_aborted_in_it(client, engine):
    """An API request's engine requests share one stream; a sequence the consumer aborts (a stop
    string) counts as ended there, so the stream ends without waiting for the engine's ABORT."""
    requests = [make_request("p0", n=2), make_request("p1")]
    outputs: list[EngineCoreOutput] = []

    async def consume() -> None:
        async for output in client.generate(requests):
            outputs.append(output)
            if output.request_id == "p0" and output.index == 1:
                await client.abort(["p0"], [1])

    task = asyncio.create_task(consume())
    assert [(await engine.receive()).request_id for _ in requests] == ["p0", "p1"]
    await engine.send_outputs(EngineCoreOutput("p1", 0, [5]), EngineCoreOutput("p0", 1, [6]),
                              EngineCoreOutput("p0", 0, [7], finish_reason=FinishReason.LENGTH))
    assert await engine.receive() == EngineCoreAbort(["p0"], [1])
    await engine.send_outputs(EngineCoreOutput("p0", 1, [], finish_reason=FinishReason.ABORT),  # not delivered
                              EngineCoreOutput("p1", 0, [8], finish_reason=FinishReason.STOP, stop_reason=0))
    await asyncio.wait_for(task, TIMEOUT_S)
    assert [(o.request_id, o.index, o.new_token_ids) for o in outputs] == [
        ("p1", 0, [5]), ("p0", 1, [6]), ("p0", 0, [7]), ("p1", 0, [8])]
    assert client._streams == {}


async def test_a_finished_request_sends_no_abort(client, engine):
    task = asyncio.create_task(collect(client, make_request("done")))
    await engine.receive()
    await engine.send_outputs(EngineCoreOutput("done", 0, [1], finish_reason=FinishReason.LENGTH))
    await asyncio.wait_for(task, TIMEOUT_S)
    # The next message on the wire is the next request, not an abort of "done".
    await client.abort(["marker"])
    message = await engine.receive()
    assert isinstance(message, EngineCoreAbort) and message.request_ids == ["marker"]


async def test_cancelled_consumer_aborts_the_engine_request(client, engine):
    started = asyncio.Event()

    async def consume() -> None:
        async for _ in client.generate([make_request("gone")]):
            started.set()

    task = asyncio.create_task(consume())
    assert (await engine.receive()).request_id == "gone"
    await engine.send_outputs(EngineCoreOutput("gone", 0, [1]))
    await asyncio.wait_for(started.wait(), TIMEOUT_S)
    task.cancel()
    message = await engine.receive()
    assert message == EngineCoreAbort(["gone"])
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_abort_of_one_sequence_carries_its_index(client, engine):
    await client.abort(["r1", "r2"], [1, 0])
    assert await engine.receive() == EngineCoreAbort(["r1", "r2"], [1, 0])


async def test_engine_dead_message_fails_in_flight_and_new_requests(client, engine):
    await engine.send(READY)
    await client.wait_ready()
    task = asyncio.create_task(collect(client, make_request("r")))
    await engine.receive()
    await engine.send(EngineDead("out of memory"))
    with pytest.raises(EngineDeadError, match="out of memory"):
        await asyncio.wait_for(task, TIMEOUT_S)
    assert client.is_dead and not client.is_ready
    assert "out of memory" in client.dead_reason
    with pytest.raises(EngineDeadError):
        await collect(client, make_request("after"))
    with pytest.raises(EngineDeadError):
        await client.wait_ready()


async def test_vanished_engine_process_is_noticed(config, engine):
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    config.engine_pid = process.pid
    client = EngineClient(config, pid_poll_interval_s=0.02)
    await client.start()
    try:
        task = asyncio.create_task(collect(client, make_request("r")))
        await engine.receive()
        process.kill()
        process.wait()
        with pytest.raises(EngineDeadError, match=str(process.pid)):
            await asyncio.wait_for(task, TIMEOUT_S)
        assert client.is_dead
    finally:
        process.kill()
        process.wait()
        await client.shutdown()


async def test_shutdown_fails_in_flight_requests(client, engine):
    task = asyncio.create_task(collect(client, make_request("r")))
    await engine.receive()
    await client.shutdown()
    with pytest.raises(EngineDeadError):
        await asyncio.wait_for(task, TIMEOUT_S)


async def test_stop_in_flight_ends_running_requests_and_aborts_them_in_the_engine(client, engine):
    await engine.send(READY)
    await client.wait_ready()
    task = asyncio.create_task(collect(client, make_request("r", n=2)))
    await engine.receive()
    await engine.send_outputs(EngineCoreOutput("r", 0, [1]), EngineCoreOutput("r", 1, [2], finish_reason=FinishReason.LENGTH))
    client.stop_in_flight("the shutdown grace period ran out")
    with pytest.raises(ServerStoppingError, match="grace period"):
        await asyncio.wait_for(task, TIMEOUT_S)
    assert await engine.receive() == EngineCoreAbort(["r"])
    assert client.is_ready  # the engine is fine; only these requests ended


async def test_undecodable_message_marks_the_engine_dead(client, engine):
    await engine.output.send(b"\x93not msgpack of the contract")
    with pytest.raises(EngineDeadError, match="lost the engine connection"):
        await asyncio.wait_for(client.wait_ready(), TIMEOUT_S)


async def test_tokens_made_after_the_client_left_are_counted_until_the_final_output(client, engine):
    started = asyncio.Event()

    async def consume() -> None:
        async for _ in client.generate([make_request("gone", n=2)]):
            started.set()

    task = asyncio.create_task(consume())
    assert (await engine.receive()).request_id == "gone"
    await engine.send_outputs(EngineCoreOutput("gone", 0, [1]), EngineCoreOutput("gone", 1, [1]))
    await asyncio.wait_for(started.wait(), TIMEOUT_S)
    client.mark_client_gone(["gone", "unknown"])  # as the serving layer does before it cancels
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await engine.receive() == EngineCoreAbort(["gone"])
    # in flight before the abort landed: 3 more tokens, then each sequence's final output
    await engine.send_outputs(EngineCoreOutput("gone", 0, [5, 6]), EngineCoreOutput("gone", 1, [7]))
    await engine.send_outputs(EngineCoreOutput("gone", 0, [], finish_reason=FinishReason.ABORT),
                              EngineCoreOutput("gone", 1, [8], finish_reason=FinishReason.ABORT))
    await engine.send_outputs(EngineCoreOutput("gone", 0, [9]))  # after its end: not counted again
    # a later request's output arrives after everything above was routed
    marker = asyncio.create_task(anext(aiter(client.generate([make_request("marker")]))))
    assert (await engine.receive()).request_id == "marker"
    await engine.send_outputs(EngineCoreOutput("marker", 0, [1]))
    await asyncio.wait_for(marker, TIMEOUT_S)
    assert client.num_tokens_after_disconnect == 4
    assert client.num_generation_tokens == 2 + 4 + 1 + 1
    assert client._num_live_after_gone == {} and "gone" not in client._streams
