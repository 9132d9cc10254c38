"""ZeroMQ endpoints: two one-way PUSH/PULL pipes over ipc:// paths in a private directory.

The engine binds both sockets (it may start first and outlive a frontend restart); the frontend
connects. PUSH/PULL keeps order per direction and queues while the peer is not yet there.
"""

from __future__ import annotations

import os
import tempfile

import zmq


def make_ipc_dir() -> str:
    """A private (0700) directory for the socket files; the launcher removes it on exit."""
    return tempfile.mkdtemp(prefix="furiosa-llm-")


def ipc_addresses(ipc_dir: str, rank: int = 0) -> tuple[str, str]:
    """(input_address, output_address) as seen from engine core `rank` (each engine of
    --data-parallel-size has its own pair)."""
    suffix = "" if rank == 0 else f"_{rank}"
    return (
        "ipc://" + os.path.join(ipc_dir, f"to_engine{suffix}.sock"),
        "ipc://" + os.path.join(ipc_dir, f"to_frontend{suffix}.sock"),
    )


def make_socket(ctx: zmq.Context, kind: int, address: str, *, bind: bool) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if kind == zmq.PUSH:
        sock.setsockopt(zmq.SNDHWM, 0)  # never drop or block on a slow reader
    if kind == zmq.PULL:
        sock.setsockopt(zmq.RCVHWM, 0)
    if bind:
        sock.bind(address)
    else:
        sock.connect(address)
    return sock
