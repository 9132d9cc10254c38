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

It also keeps the counts the metrics read: the engine's latest `SchedulerStats`, every
generated token, and the tokens the engine still made for requests whose client had gone
(from `mark_client_gone` until each sequence's final output).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
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


class EngineClient:
    def __init__(self, config: FrontendConfig, *, pid_poll_interval_s: float = 0.5) -> None:
        self.config = config
        self.pid_poll_interval_s = pid_poll_interval_s
        self.model_info: EngineReady | None = None
        self.latest_stats: SchedulerStats | None = None
        self.dead_reason: str | None = None
        self._ctx: zmq.asyncio.Context | None = None
        self._input: zmq.asyncio.Socket | None = None
        self._output: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task] = []
        self._streams: dict[str, _OutputStream] = {}  # request id -> its API request's stream
        self.num_generation_tokens = 0
        self.num_tokens_after_disconnect = 0
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
        self._input = make_socket(self._ctx, zmq.PUSH, self.config.engine.input_address, bind=False)
        self._output = make_socket(self._ctx, zmq.PULL, self.config.engine.output_address, bind=False)
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
                self._send(request)
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
            self._send(EngineCoreAbort(list(unfinished)))
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
            self._send(EngineCoreAbort(list(request_ids), indices))

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
            stream = self._streams.get(output.request_id)
            if stream is not None:
                stream.queue.put_nowait(output)
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
