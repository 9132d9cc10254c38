"""Data-parallel routing: `EngineRouter` alone, and `EngineClient` against two fake engines made
of real ZeroMQ sockets (no model)."""

from __future__ import annotations

import asyncio

import pytest
import zmq
import zmq.asyncio

from frontend.config import FrontendConfig
from frontend.data_parallel import parse_size, plan
from frontend.engine_client import AFFINITY_MIN_SLACK, EngineClient, EngineDeadError, EngineRouter
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
from ipc.shared.prefix_hash import prefix_block_hashes
from ipc.sockets import ipc_addresses, make_socket

BLOCK = 16
SYSTEM = list(range(1000, 1000 + 4 * BLOCK))  # a 4-block prefix several prompts share
TIMEOUT_S = 5.0  # a bound on waiting for an event that should come at once, not a delay


def prompt(prefix: list[int], tail_start: int, length: int = BLOCK + 3) -> list[int]:
    return prefix + list(range(tail_start, tail_start + length))


# --- EngineRouter -----------------------------------------------------------------------


def test_a_shared_prefix_goes_to_the_engine_that_cached_it():
    router = EngineRouter(2, BLOCK)
    first = router.choose(prompt(SYSTEM, 1), None, [0, 0])
    # the other engine is now less loaded, but within the slack: the prefix wins
    assert router.choose(prompt(SYSTEM, 500), None, [1, 0]) == first
    assert router.choose(prompt(SYSTEM, 900), None, [AFFINITY_MIN_SLACK, 0]) == first


def test_load_balances_prompts_that_share_nothing():
    router = EngineRouter(2, BLOCK)
    loads = [0, 0]
    for k in range(10):
        rank = router.choose(list(range(k * 100, k * 100 + 3 * BLOCK)), None, loads)
        assert loads[rank] == min(loads)
        loads[rank] += 1
    assert loads == [5, 5]


def test_load_overrides_affinity_beyond_the_slack():
    router = EngineRouter(2, BLOCK)
    first = router.choose(prompt(SYSTEM, 1), None, [0, 0])
    loads = [0, 0]
    loads[first] = AFFINITY_MIN_SLACK + 1
    assert router.choose(prompt(SYSTEM, 2), None, loads) == 1 - first
    # both hold the prefix now, so load alone decides between them
    assert router.choose(prompt(SYSTEM, 3), None, [3, 2]) == 1
    assert router.choose(prompt(SYSTEM, 4), None, [2, 3]) == 0


def test_a_common_prefix_does_not_pile_concurrent_load_on_one_engine():
    router = EngineRouter(2, BLOCK)
    loads = [0, 0]
    for k in range(64):
        loads[router.choose(prompt(SYSTEM, 10 * k), None, loads)] += 1
    assert abs(loads[0] - loads[1]) <= AFFINITY_MIN_SLACK + 1, loads


def test_cache_salt_keeps_tenants_apart():
    router = EngineRouter(2, BLOCK)
    first = router.choose(prompt(SYSTEM, 1), "tenant-a", [0, 0])
    # another tenant's identical prompt finds nothing cached: the least loaded engine gets it
    loads = [0, 0]
    loads[first] = 1
    assert router.choose(prompt(SYSTEM, 1), "tenant-b", loads) == 1 - first
    # and the first tenant still finds its own
    assert router.choose(prompt(SYSTEM, 7), "tenant-a", loads) == first
    assert router.num_cached_blocks(first, prefix_block_hashes(SYSTEM, BLOCK, None)) == 0


def test_the_router_names_blocks_as_the_engine_does():
    from engine_core.kv_cache_manager import block_hash  # the engine's own name for a block

    tokens = prompt(SYSTEM, 1)
    parent, names = None, []
    for start in range(0, len(tokens) // BLOCK * BLOCK, BLOCK):
        parent = block_hash(parent, tokens[start:start + BLOCK])
        names.append(parent)
    assert prefix_block_hashes(tokens, BLOCK, None) == names


def test_without_prefix_caching_only_load_counts():
    router = EngineRouter(2, BLOCK, is_prefix_caching=False)
    first = router.choose(prompt(SYSTEM, 1), None, [0, 0])
    loads = [0, 0]
    loads[first] = 1
    assert router.choose(prompt(SYSTEM, 1), None, loads) == 1 - first


def test_remembered_blocks_are_bounded_by_the_engines_kv_capacity():
    router = EngineRouter(1 + 1, BLOCK)
    router.max_remembered = [8, 8]
    for k in range(10):
        router.remember(0, prefix_block_hashes(list(range(k * 1000, k * 1000 + 4 * BLOCK)), BLOCK, None))
    assert len(router.remembered[0]) == 8


# --- --data-parallel-size plans -----------------------------------------------------------


def test_parse_size_accepts_auto_and_positive_integers():
    assert parse_size("auto") == "auto" and parse_size("3") == 3
    for bad in ("0", "-1", "two"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_each_engine_gets_its_own_cpus_when_there_are_enough(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x" * 1000)
    two = plan(2, 1, str(model), 1.0, cpus=[0, 1, 2, 3], root=str(tmp_path))
    assert two.size == 2 and len({cpu for s in two.cpu_sets for cpu in s}) == 2
    assert all(len(s) == 1 for s in two.cpu_sets)
    threads = plan(2, 2, str(model), 1.0, cpus=[0, 1, 2, 3], root=str(tmp_path))
    assert sorted(cpu for s in threads.cpu_sets for cpu in s) == [0, 1, 2, 3]
    crowded = plan(3, 1, str(model), 1.0, cpus=[0, 1], root=str(tmp_path))
    assert crowded.cpu_sets == [[], [], []] and "not pinned" in crowded.reason
    assert plan(1, 1, str(model), 1.0, cpus=[0, 1], root=str(tmp_path)).cpu_sets == [[]]  # one engine is never pinned


def test_auto_is_bounded_by_cores_and_by_memory(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x" * 1000)
    gib = 1024**3
    roomy = plan("auto", 1, str(model), 1.0, cpus=[0, 1], available_bytes=64 * gib, root=str(tmp_path))
    assert roomy.size <= 2 and "auto" in roomy.reason
    tight = plan("auto", 1, str(model), 4.0, cpus=[0, 1], available_bytes=6 * gib, root=str(tmp_path))
    assert tight.size == 1 and "memory fits 1" in tight.reason


# --- EngineClient with two engines -------------------------------------------------------

STATS = SchedulerStats(num_running=0, num_waiting=0, kv_cache_usage=0.0, num_preemptions=0,
                       num_prompt_tokens_computed=0)


class FakeEngine:
    def __init__(self, input_address: str, output_address: str) -> None:
        self.ctx = zmq.asyncio.Context()
        self.input = make_socket(self.ctx, zmq.PULL, input_address, bind=True)
        self.output = make_socket(self.ctx, zmq.PUSH, output_address, bind=True)

    async def receive(self):
        return decode_to_engine(await asyncio.wait_for(self.input.recv(), TIMEOUT_S))

    async def has_message(self) -> bool:
        return bool(await self.input.poll(timeout=100))

    async def send(self, message) -> None:
        await self.output.send(encode(message))

    def close(self) -> None:
        self.ctx.destroy(linger=0)


@pytest.fixture
def two_engine_config(tmp_path) -> FrontendConfig:
    endpoints = [ipc_addresses(str(tmp_path), rank) for rank in range(2)]
    engine = EngineConfig(model="m", served_model_name="m", block_size=BLOCK, data_parallel_size=2,
                          input_address=endpoints[0][0], output_address=endpoints[0][1])
    return FrontendConfig(engine=engine, engine_addresses=endpoints)


@pytest.fixture
async def engines(two_engine_config):
    fakes = [FakeEngine(*endpoint) for endpoint in two_engine_config.engine_addresses]
    yield fakes
    for fake in fakes:
        fake.close()


@pytest.fixture
async def client(two_engine_config, engines):
    engine_client = EngineClient(two_engine_config)
    await engine_client.start()
    yield engine_client
    await engine_client.shutdown()


def request(request_id: str, tokens: list[int], **params) -> EngineCoreRequest:
    return EngineCoreRequest(request_id, tokens, SamplingParams(max_tokens=4, **params), [2], 0.0)


async def start(client, req: EngineCoreRequest) -> asyncio.Task:
    async def collect():
        return [output async for output in client.generate([req])]
    return asyncio.create_task(collect())


async def received_by(engines: list[FakeEngine]) -> tuple[int, object]:
    """Which engine got the next message, and the message."""
    for rank, engine in enumerate(engines):
        if await engine.has_message():
            return rank, await engine.receive()
    raise AssertionError("no engine received a message")


@pytest.mark.anyio
async def test_ready_only_when_every_engine_is_ready(client, engines):
    ready = EngineReady("m", 256, 1000, num_kv_blocks=64, block_size=BLOCK)
    await engines[1].send(ready)
    waiter = asyncio.create_task(client.wait_ready())
    done, _ = await asyncio.wait([waiter], timeout=0.5)  # engine 0 has not said it is ready
    assert not done and not client.is_ready
    await engines[0].send(ready)
    assert (await asyncio.wait_for(waiter, TIMEOUT_S)).num_kv_blocks == 64
    assert client.is_ready and client.router.max_remembered == [64, 64]


@pytest.mark.anyio
async def test_all_choices_of_a_request_stay_on_one_engine_and_count_as_its_load(client, engines):
    task = await start(client, request("nbest", list(range(40)), n=2, best_of=3))
    rank, message = await received_by(engines)
    assert message.request_id == "nbest"
    assert client.engines[rank].load == 3  # best_of sequences, all there
    # the next request, sharing nothing, goes to the other engine
    other = await start(client, request("other", list(range(500, 540))))
    other_rank, _ = await received_by(engines)
    assert other_rank == 1 - rank
    for index in range(2):  # the n best of the best_of candidates come back
        await engines[rank].send(EngineCoreOutputs(
            [EngineCoreOutput("nbest", index, [5], finish_reason=FinishReason.LENGTH)], STATS, 0.0))
    outputs = await asyncio.wait_for(task, TIMEOUT_S)
    assert sorted(o.index for o in outputs) == [0, 1] and client.engines[rank].load == 0
    other.cancel()
    _, abort = await received_by(engines)
    assert abort == EngineCoreAbort(["other"])
    assert not await engines[rank].has_message()  # the abort went only to its engine


@pytest.mark.anyio
async def test_one_engines_death_fails_the_requests_on_every_engine(client, engines):
    tasks = [await start(client, request(f"r{k}", list(range(k * 100, k * 100 + 20)))) for k in range(2)]
    ranks = {(await received_by(engines))[0] for _ in tasks}
    assert ranks == {0, 1}
    await engines[1].send(EngineDead("boom"))
    for task in tasks:
        with pytest.raises(EngineDeadError, match="engine core 1 died: boom"):
            await asyncio.wait_for(task, TIMEOUT_S)
    assert client.is_dead and not client.is_ready


@pytest.mark.anyio
async def test_latest_stats_add_up_and_engine_stats_stay_apart(client, engines):
    for rank, engine in enumerate(engines):
        stats = SchedulerStats(num_running=rank + 1, num_waiting=rank, kv_cache_usage=0.5 * rank,
                               num_preemptions=1, num_prompt_tokens_computed=10 * (rank + 1))
        await engine.send(EngineCoreOutputs([], stats, 0.0))
        await engine.send(EngineReady("m", 256, 1000, num_kv_blocks=64, block_size=BLOCK))
    await asyncio.wait_for(client.wait_ready(), TIMEOUT_S)  # each socket's stats came before its ready
    assert [s.num_running for s in client.engine_stats] == [1, 2]
    total = client.latest_stats
    assert (total.num_running, total.num_waiting, total.num_preemptions, total.num_prompt_tokens_computed) == (3, 1, 2, 30)
    assert total.kv_cache_usage == 0.25


@pytest.mark.anyio
async def test_a_refused_request_leaves_no_load_behind(client, engines):
    async def until_error():  # as the output processor does: an ERROR output ends the request
        async for output in client.generate([request("refused", list(range(40)), n=3)]):
            if output.finish_reason == FinishReason.ERROR:
                return output.error

    task = asyncio.create_task(until_error())
    rank, _ = await received_by(engines)
    assert client.engines[rank].load == 3
    # the engine refuses a request with one ERROR output, whatever its n
    await engines[rank].send(EngineCoreOutputs(
        [EngineCoreOutput("refused", 0, [], finish_reason=FinishReason.ERROR, error="too long")], STATS, 0.0))
    assert await asyncio.wait_for(task, TIMEOUT_S) == "too long"
    assert client.engines[rank].load == 0


def test_the_flag_takes_n_or_auto_and_refuses_anything_else(capsys):
    from frontend.cli import build_parser, config_from_args

    parser = build_parser()
    assert parser.parse_args(["serve"]).data_parallel_size == "auto"
    assert config_from_args(parser.parse_args(["serve", "--data-parallel-size", "2"])).engine.data_parallel_size == 2
    assert config_from_args(parser.parse_args(["serve", "--data-parallel-size", "auto"])).engine.data_parallel_size >= 1
    for bad in ("0", "many"):
        with pytest.raises(SystemExit):
            parser.parse_args(["serve", "--data-parallel-size", bad])
        assert "--data-parallel-size: must be a positive integer or auto" in capsys.readouterr().err
