"""The frontend's side of the ZeroMQ pipes to the engine core.

One background task reads every `EngineToFrontend` message and routes each `EngineCoreOutput`
to the stream of its request: `generate(requests)` delivers the outputs of one API request's
engine requests (one a prompt) on one queue, the one hop between the socket and the output
processor. The client is the one place that counts a request's finished sequences: its stream
ends once each sequence has had its final output or was aborted by the consumer (a stop
string), so nothing downstream counts them again. Engine death (an `EngineDead` message, or the
engine's pid vanishing) wakes every waiting `generate()` with `EngineDeadError`, so no request
hangs on an engine that is gone. A shutdown whose grace period runs out ends the requests still
in flight with `ServerStoppingError` (`stop_in_flight`).

It also keeps the counts the metrics read: each engine's latest `SchedulerStats`, every
generated token, and the tokens the engine still made for requests whose client had gone
(from `mark_client_gone` until each sequence's final output).

Data parallelism (`--data-parallel-size N`): the client holds one pair of sockets per engine
core (each engine binds its own) and one reader task each. `EngineRouter` is the one place that
picks an engine for each engine request (all its n / best_of / beam sequences stay there): the
engine whose prefix cache most likely holds the prompt's leading blocks, unless it is busier
than the least loaded engine by more than a small slack, else the least loaded. Aborts follow
their request to its engine. The death of any engine is the death of the client: every request
fails, /health turns 503 and the launcher stops the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable

import zmq
import zmq.asyncio

from frontend.config import FrontendConfig
from ipc.messages import (
    EngineCoreAbort,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineDead,
    EngineReady,
    FinishReason,
    FrontendToEngine,
    SchedulerStats,
    decode_to_frontend,
    encode,
)
from ipc.shared.prefix_hash import prefix_block_hashes
from ipc.sockets import make_socket

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine core is gone; no request can be served any more."""


class ServerStoppingError(RuntimeError):
    """The server is shutting down and its grace period for in-flight requests ran out."""


class _OutputStream:
    """The outputs of one API request's engine requests, and which of their sequences are live:
    not yet final in the engine, and not aborted by the consumer."""

    def __init__(self, requests: list[EngineCoreRequest]) -> None:
        self.queue: asyncio.Queue[EngineCoreOutput | Exception] = asyncio.Queue()
        self.live_indices = {r.request_id: set(range(r.sampling_params.n)) for r in requests}
        self.is_client_gone = False

    @property
    def has_live(self) -> bool:
        return any(self.live_indices.values())

    def is_live(self, output: EngineCoreOutput) -> bool:
        return output.index in self.live_indices[output.request_id]

    def end(self, request_id: str, index: int | None = None) -> None:
        """Sequence `index` of `request_id` (None: all of them) has no more outputs to deliver."""
        if index is None:
            self.live_indices[request_id].clear()
        else:
            self.live_indices[request_id].discard(index)


# Prefix affinity gives way to load: the engine that holds a prompt's prefix gets the request
# unless it already has more than this many sequences beyond the least loaded engine (or a
# quarter more, when busier), so a prefix every request shares (a system prompt) cannot pile all
# traffic on one engine: once the other engine took one such request, both hold it and load
# decides.
AFFINITY_MIN_SLACK = 2
AFFINITY_SLACK_FRACTION = 0.25
MAX_AFFINITY_BLOCKS = 128  # leading blocks named per prompt (2048 tokens at block size 16)
DEFAULT_REMEMBERED_BLOCKS = 4096  # per engine, until its ready message gives its KV capacity


class EngineRouter:
    """Picks the engine for each engine request: by prefix affinity, then load. It remembers,
    per engine, the names of the leading blocks of prompts it sent there (least recently used
    first out, as many as the engine's KV cache has blocks), named as the engine names them
    (`ipc.shared.prefix_hash`, cache_salt included, so tenants never attract each other)."""

    def __init__(self, num_engines: int, block_size: int, *, is_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.is_prefix_caching = is_prefix_caching
        self.remembered: list[OrderedDict[bytes, None]] = [OrderedDict() for _ in range(num_engines)]
        self.max_remembered = [DEFAULT_REMEMBERED_BLOCKS] * num_engines

    def choose(self, prompt_token_ids: list[int], cache_salt: str | None, loads: list[int]) -> int:
        """The engine for a prompt, given each engine's sequences in flight; remembers that its
        blocks are now cached there."""
        if len(loads) == 1:
            return 0
        hashes = self._hashes(prompt_token_ids, cache_salt)
        min_load = min(loads)
        slack = max(AFFINITY_MIN_SLACK, int(min_load * AFFINITY_SLACK_FRACTION))
        candidates = [rank for rank, load in enumerate(loads) if load <= min_load + slack]
        rank = min(candidates, key=lambda r: (-self.num_cached_blocks(r, hashes), loads[r], r))
        self.remember(rank, hashes)
        return rank

    def num_cached_blocks(self, rank: int, hashes: list[bytes]) -> int:
        """How many of the leading `hashes` engine `rank` was sent (a chain: the first miss ends it)."""
        remembered = self.remembered[rank]
        count = 0
        for h in hashes:
            if h not in remembered:
                break
            count += 1
        return count

    def remember(self, rank: int, hashes: list[bytes]) -> None:
        remembered = self.remembered[rank]
        for h in hashes:
            remembered[h] = None
            remembered.move_to_end(h)
        while len(remembered) > self.max_remembered[rank]:
            remembered.popitem(last=False)

    def _hashes(self, prompt_token_ids: list[int], cache_salt: str | None) -> list[bytes]:
        if not self.is_prefix_caching:
            return []
        return prefix_block_hashes(prompt_token_ids, self.block_size, cache_salt, MAX_AFFINITY_BLOCKS)


class _Engine:
    """One engine core as the client sees it: its sockets, facts, stats, and the sequences it
    was sent that have not had their final output yet (the router's load)."""

    def __init__(self, rank: int, input_address: str, output_address: str, pid: int | None) -> None:
        self.rank = rank
        self.input_address, self.output_address = input_address, output_address
        self.pid = pid
        self.input: zmq.asyncio.Socket | None = None
        self.output: zmq.asyncio.Socket | None = None
        self.model_info: EngineReady | None = None
        self.stats: SchedulerStats | None = None
        # request id -> [final outputs still to come (one per returned choice), sequences it
        # runs (best_of / beam candidates: more than it returns)]
        self.in_flight: dict[str, list[int]] = {}

    @property
    def load(self) -> int:
        """Sequences in flight: the frontend's own count, or the engine's running + waiting if
        that is more (aborted sequences the engine has not reached yet)."""
        in_flight = sum(num_sequences for _, num_sequences in self.in_flight.values())
        reported = 0 if self.stats is None else self.stats.num_running + self.stats.num_waiting
        return max(in_flight, reported)


class EngineClient:
    def __init__(self, config: FrontendConfig, *, pid_poll_interval_s: float = 0.5) -> None:
        self.config = config
        self.pid_poll_interval_s = pid_poll_interval_s
        self.dead_reason: str | None = None
        self._ctx: zmq.asyncio.Context | None = None
        pids = config.engine_pids or [config.engine_pid]
        self.engines = [_Engine(rank, input_address, output_address, pids[rank] if rank < len(pids) else None)
                        for rank, (input_address, output_address) in enumerate(config.engine_endpoints)]
        self.router = EngineRouter(len(self.engines), config.engine.block_size,
                                   is_prefix_caching=config.engine.enable_prefix_caching)
        self._engine_of: dict[str, _Engine] = {}  # request id -> the engine it was sent to
        self._tasks: list[asyncio.Task] = []
        self._streams: dict[str, _OutputStream] = {}  # request id -> its API request's stream
        self.num_generation_tokens = 0
        self.num_tokens_after_disconnect = 0
        self._num_live_after_gone: dict[str, int] = {}  # request id -> sequences not yet final
        self._ready = asyncio.Event()
        self._dead = asyncio.Event()

    @property
    def model_info(self) -> EngineReady | None:
        """The engines' facts (rank 0's: all serve the same model), once every engine is ready."""
        if any(engine.model_info is None for engine in self.engines):
            return None
        return self.engines[0].model_info

    @property
    def engine_stats(self) -> list[SchedulerStats | None]:
        """Each engine's latest stats, in rank order."""
        return [engine.stats for engine in self.engines]

    @property
    def latest_stats(self) -> SchedulerStats | None:
        """All engines' latest stats added up (KV cache usage: their mean)."""
        known = [stats for stats in self.engine_stats if stats is not None]
        if not known:
            return None
        if len(known) == 1:
            return known[0]
        total = SchedulerStats(*(sum(getattr(s, f) for s in known) for f in SchedulerStats.__struct_fields__))
        total.kv_cache_usage = sum(s.kv_cache_usage for s in self.engine_stats if s is not None) / len(self.engines)
        return total

    @property
    def is_ready(self) -> bool:
        return self.model_info is not None and not self.is_dead

    @property
    def is_dead(self) -> bool:
        return self.dead_reason is not None

    async def start(self) -> None:
        self._ctx = zmq.asyncio.Context()
        for engine in self.engines:
            engine.input = make_socket(self._ctx, zmq.PUSH, engine.input_address, bind=False)
            engine.output = make_socket(self._ctx, zmq.PULL, engine.output_address, bind=False)
            self._tasks.append(asyncio.create_task(self._read_outputs(engine), name=f"engine-outputs-{engine.rank}"))
            if engine.pid is not None:
                self._tasks.append(asyncio.create_task(self._watch_pid(engine), name=f"engine-pid-{engine.rank}"))

    async def wait_ready(self) -> EngineReady:
        ready = asyncio.ensure_future(self._ready.wait())
        dead = asyncio.ensure_future(self._dead.wait())
        try:
            await asyncio.wait([ready, dead], return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            dead.cancel()
        if self.is_dead:
            raise EngineDeadError(self.dead_reason)
        assert self.model_info is not None
        return self.model_info

    async def generate(self, requests: list[EngineCoreRequest]) -> AsyncIterator[EngineCoreOutput]:
        """Yields every output of `requests` (one API request's prompts), in arrival order,
        until each of their sequences has finished or been aborted with `abort()`.

        Closing or cancelling the iterator early aborts what is still running in the engine.
        """
        if self.is_dead:
            raise EngineDeadError(self.dead_reason)
        for request in requests:
            if request.request_id in self._streams:
                raise ValueError(f"request {request.request_id!r} is already running")
        stream = _OutputStream(requests)
        for request in requests:
            self._streams[request.request_id] = stream
        try:
            for request in requests:
                self._send_request(request)
            while stream.has_live:
                item = await stream.queue.get()
                if isinstance(item, Exception):
                    raise item
                if not stream.is_live(item):
                    continue  # a late output of a sequence the consumer aborted
                if item.finish_reason is not None:
                    stream.end(item.request_id, item.index)
                yield item
        finally:
            self._close(stream)

    def _close(self, stream: _OutputStream) -> None:
        """Forget a finished or abandoned stream; abort in the engine whatever is still live."""
        for request_id in stream.live_indices:
            del self._streams[request_id]
        while not stream.queue.empty():  # outputs routed but never consumed
            item = stream.queue.get_nowait()
            if isinstance(item, EngineCoreOutput) and stream.is_live(item):
                if item.finish_reason is not None:
                    stream.end(item.request_id, item.index)
                if stream.is_client_gone:
                    self.num_tokens_after_disconnect += len(item.new_token_ids)
        unfinished = {r: len(live) for r, live in stream.live_indices.items() if live}
        if unfinished and not self.is_dead:
            logger.info("aborting requests %s (their consumer stopped early)", ", ".join(unfinished))
            self._send_abort(list(unfinished), None)
            if stream.is_client_gone:
                self._num_live_after_gone.update(unfinished)

    def mark_client_gone(self, request_ids: Iterable[str]) -> None:
        """The client of these running requests went away; their remaining tokens are waste."""
        for request_id in request_ids:
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.is_client_gone = True

    async def abort(self, request_ids: list[str], indices: list[int] | None = None) -> None:
        """Abort sequence `indices[k]` of `request_ids[k]` (without `indices`: every sequence of
        each request); their streams deliver nothing more of them."""
        for k, request_id in enumerate(request_ids):
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.end(request_id, None if indices is None else indices[k])
        if not self.is_dead:
            self._send_abort(list(request_ids), indices)

    def stop_in_flight(self, reason: str) -> None:
        """End every running `generate()` with `ServerStoppingError` (their engine requests are
        aborted as each consumer stops), so a stream ends with an error event instead of being
        cut off when the shutdown's grace period runs out."""
        streams = self._live_streams()
        if streams:
            logger.warning("ending %d requests still in flight: %s", len(streams), reason)
        for stream in streams:
            stream.queue.put_nowait(ServerStoppingError(reason))

    def _live_streams(self) -> list[_OutputStream]:
        return list({id(stream): stream for stream in self._streams.values()}.values())

    async def shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if not self.is_dead:
            self._mark_dead("the frontend is shutting down", is_failure=False)
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
            self._ctx = None

    def _send_request(self, request: EngineCoreRequest) -> None:
        """To the engine the router picks; all the request's sequences stay there."""
        params = request.sampling_params
        rank = self.router.choose(request.prompt_token_ids, params.cache_salt,
                                  [engine.load for engine in self.engines])
        engine = self.engines[rank]
        self._engine_of[request.request_id] = engine
        engine.in_flight[request.request_id] = [params.n, params.num_candidates]
        self._send(engine, request)

    def _send_abort(self, request_ids: list[str], indices: list[int] | None) -> None:
        """Each abort to the engine its request went to; one the client no longer tracks (its
        sequences all final) to every engine, as aborts are idempotent."""
        by_engine: dict[int, tuple[list[str], list[int]]] = {}
        for k, request_id in enumerate(request_ids):
            engine = self._engine_of.get(request_id)
            for rank in range(len(self.engines)) if engine is None else [engine.rank]:
                ids, engine_indices = by_engine.setdefault(rank, ([], []))
                ids.append(request_id)
                if indices is not None:
                    engine_indices.append(indices[k])
        for rank, (ids, engine_indices) in by_engine.items():
            self._send(self.engines[rank], EngineCoreAbort(ids, engine_indices if indices is not None else None))

    def _send(self, engine: _Engine, message: FrontendToEngine) -> None:
        # PUSH with no high-water mark queues instead of blocking, so the returned future is
        # already resolved; not awaiting keeps this usable from a generator's `finally`.
        assert engine.input is not None, "EngineClient.start() was not called"
        engine.input.send(encode(message), copy=False)

    async def _read_outputs(self, engine: _Engine) -> None:
        assert engine.output is not None
        name = "the engine core" if len(self.engines) == 1 else f"engine core {engine.rank}"
        try:
            while True:
                message = decode_to_frontend(await engine.output.recv())
                if isinstance(message, EngineCoreOutputs):
                    self._route(engine, message)
                elif isinstance(message, EngineReady):
                    engine.model_info = message
                    self.router.max_remembered[engine.rank] = message.num_kv_blocks
                    logger.info("%s ready: %s", name, message)
                    if self.model_info is not None:
                        self._ready.set()
                elif isinstance(message, EngineDead):
                    self._mark_dead(f"{name} died: {message.reason}")
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a message we cannot decode means the contract is broken
            logger.exception("engine output reader failed")
            self._mark_dead(f"lost the {'engine' if len(self.engines) == 1 else name} connection: {exc}")

    def _route(self, engine: _Engine, message: EngineCoreOutputs) -> None:
        engine.stats = message.stats
        for output in message.outputs:
            if output.finish_reason is not None:
                self._count_final(engine, output.request_id, is_error=output.finish_reason == FinishReason.ERROR)
            self.num_generation_tokens += len(output.new_token_ids)
            stream = self._streams.get(output.request_id)
            if stream is not None:
                stream.queue.put_nowait(output)
            elif output.request_id in self._num_live_after_gone:
                self._count_after_disconnect(output)
            # else: a late output of a request we stopped ourselves (a stop string); dropped

    def _count_final(self, engine: _Engine, request_id: str, *, is_error: bool) -> None:
        """One of the request's sequences is final in its engine (finished or aborted); an error
        may be the one output of a refused request, so it ends the whole request's count."""
        counts = engine.in_flight.get(request_id)
        if counts is not None and counts[0] > 1 and not is_error:
            counts[0] -= 1
        else:
            engine.in_flight.pop(request_id, None)
            self._engine_of.pop(request_id, None)

    def _count_after_disconnect(self, output: EngineCoreOutput) -> None:
        request_id = output.request_id
        self.num_tokens_after_disconnect += len(output.new_token_ids)
        if output.finish_reason is not None:
            self._num_live_after_gone[request_id] -= 1
            if self._num_live_after_gone[request_id] <= 0:
                del self._num_live_after_gone[request_id]

    async def _watch_pid(self, engine: _Engine) -> None:
        pid = engine.pid
        assert pid is not None
        while not self.is_dead:
            if not _process_exists(pid):
                self._mark_dead(f"the engine core process {pid} exited")
                return
            await asyncio.sleep(self.pid_poll_interval_s)

    def _mark_dead(self, reason: str, *, is_failure: bool = True) -> None:
        if self.is_dead:
            return
        logger.log(logging.ERROR if is_failure else logging.INFO, "%s", reason)
        self.dead_reason = reason
        self._dead.set()
        self._num_live_after_gone.clear()
        error = EngineDeadError(reason)
        for stream in self._live_streams():
            stream.queue.put_nowait(error)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    # A zombie still answers kill(0) until its parent (the launcher) reaps it.
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in (b"Z", b"X")
