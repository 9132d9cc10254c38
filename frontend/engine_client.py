"""The frontend's side of the ZeroMQ pipes to the engine core.

One background task reads every `EngineToFrontend` message and routes each `EngineCoreOutput`
to the queue of its request; `generate()` drains that queue. Engine death (an `EngineDead`
message, or the engine's pid vanishing) wakes every waiting `generate()` with
`EngineDeadError`, so no request hangs on an engine that is gone. A shutdown whose grace period
runs out ends the requests still in flight with `ServerStoppingError` (`stop_in_flight`).

It also keeps the counts the metrics read: the engine's latest `SchedulerStats`, every
generated token, and the tokens the engine still made for requests whose client had gone
(from `mark_client_gone` until each sequence's final output).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator

import zmq
import zmq.asyncio

from ipc.config import ServeConfig
from ipc.messages import (
    EngineCoreAbort,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineDead,
    EngineReady,
    FrontendToEngine,
    SchedulerStats,
    decode_to_frontend,
    encode,
)
from ipc.sockets import make_socket

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine core is gone; no request can be served any more."""


class ServerStoppingError(RuntimeError):
    """The server is shutting down and its grace period for in-flight requests ran out."""


class EngineClient:
    def __init__(self, config: ServeConfig, *, pid_poll_interval_s: float = 0.5) -> None:
        self.config = config
        self.pid_poll_interval_s = pid_poll_interval_s
        self.model_info: EngineReady | None = None
        self.latest_stats: SchedulerStats | None = None
        self.dead_reason: str | None = None
        self._ctx: zmq.asyncio.Context | None = None
        self._input: zmq.asyncio.Socket | None = None
        self._output: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task] = []
        self._queues: dict[str, asyncio.Queue[EngineCoreOutput | Exception]] = {}
        self.num_generation_tokens = 0
        self.num_tokens_after_disconnect = 0
        self._client_gone_ids: set[str] = set()  # still in _queues, consumer leaving
        self._num_live_after_gone: dict[str, int] = {}  # request id -> sequences not yet final
        self._ready = asyncio.Event()
        self._dead = asyncio.Event()

    @property
    def is_ready(self) -> bool:
        return self.model_info is not None and not self.is_dead

    @property
    def is_dead(self) -> bool:
        return self.dead_reason is not None

    async def start(self) -> None:
        self._ctx = zmq.asyncio.Context()
        self._input = make_socket(self._ctx, zmq.PUSH, self.config.input_address, bind=False)
        self._output = make_socket(self._ctx, zmq.PULL, self.config.output_address, bind=False)
        self._tasks.append(asyncio.create_task(self._read_outputs(), name="engine-outputs"))
        if self.config.engine_pid is not None:
            self._tasks.append(asyncio.create_task(self._watch_pid(), name="engine-pid"))

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

    async def generate(self, request: EngineCoreRequest) -> AsyncIterator[EngineCoreOutput]:
        """Yields every output of `request` until all its sequences have finished.

        Closing or cancelling the iterator early aborts the request in the engine.
        """
        if self.is_dead:
            raise EngineDeadError(self.dead_reason)
        request_id = request.request_id
        if request_id in self._queues:
            raise ValueError(f"request {request_id!r} is already running")
        queue: asyncio.Queue[EngineCoreOutput | Exception] = asyncio.Queue()
        self._queues[request_id] = queue
        num_sequences = request.sampling_params.n
        finished: set[int] = set()
        try:
            self._send(request)
            while len(finished) < num_sequences:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                if item.finish_reason is not None:
                    finished.add(item.index)
                yield item
        finally:
            del self._queues[request_id]
            is_client_gone = request_id in self._client_gone_ids
            self._client_gone_ids.discard(request_id)
            while not queue.empty():  # outputs routed but never consumed
                item = queue.get_nowait()
                if isinstance(item, EngineCoreOutput):
                    if item.finish_reason is not None:
                        finished.add(item.index)
                    if is_client_gone:
                        self.num_tokens_after_disconnect += len(item.new_token_ids)
            if len(finished) < num_sequences and not self.is_dead:
                logger.info("aborting request %s (its consumer stopped early)", request_id)
                self._send(EngineCoreAbort([request_id]))
                if is_client_gone:
                    self._num_live_after_gone[request_id] = num_sequences - len(finished)

    def mark_client_gone(self, request_ids: list[str]) -> None:
        """The client of these running requests went away; their remaining tokens are waste."""
        self._client_gone_ids.update(r for r in request_ids if r in self._queues)

    async def abort(self, request_ids: list[str], indices: list[int] | None = None) -> None:
        if not self.is_dead:
            self._send(EngineCoreAbort(list(request_ids), indices))

    def stop_in_flight(self, reason: str) -> None:
        """End every running `generate()` with `ServerStoppingError` (their engine requests are
        aborted as each consumer stops), so a stream ends with an error event instead of being
        cut off when the shutdown's grace period runs out."""
        if self._queues:
            logger.warning("ending %d requests still in flight: %s", len(self._queues), reason)
        for queue in self._queues.values():
            queue.put_nowait(ServerStoppingError(reason))

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

    def _send(self, message: FrontendToEngine) -> None:
        # PUSH with no high-water mark queues instead of blocking, so the returned future is
        # already resolved; not awaiting keeps this usable from a generator's `finally`.
        assert self._input is not None, "EngineClient.start() was not called"
        self._input.send(encode(message), copy=False)

    async def _read_outputs(self) -> None:
        assert self._output is not None
        try:
            while True:
                message = decode_to_frontend(await self._output.recv())
                if isinstance(message, EngineCoreOutputs):
                    self._route(message)
                elif isinstance(message, EngineReady):
                    self.model_info = message
                    self._ready.set()
                    logger.info("engine ready: %s", message)
                elif isinstance(message, EngineDead):
                    self._mark_dead(f"the engine core died: {message.reason}")
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a message we cannot decode means the contract is broken
            logger.exception("engine output reader failed")
            self._mark_dead(f"lost the engine connection: {exc}")

    def _route(self, message: EngineCoreOutputs) -> None:
        self.latest_stats = message.stats
        for output in message.outputs:
            self.num_generation_tokens += len(output.new_token_ids)
            queue = self._queues.get(output.request_id)
            if queue is not None:
                queue.put_nowait(output)
            elif output.request_id in self._num_live_after_gone:
                self._count_after_disconnect(output)
            # else: a late output of a request we stopped ourselves (a stop string); dropped

    def _count_after_disconnect(self, output: EngineCoreOutput) -> None:
        request_id = output.request_id
        self.num_tokens_after_disconnect += len(output.new_token_ids)
        if output.finish_reason is not None:
            self._num_live_after_gone[request_id] -= 1
            if self._num_live_after_gone[request_id] <= 0:
                del self._num_live_after_gone[request_id]

    async def _watch_pid(self) -> None:
        pid = self.config.engine_pid
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
        for queue in self._queues.values():
            queue.put_nowait(error)


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
