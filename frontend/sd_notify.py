"""systemd's notification protocol without libsystemd: one datagram to `$NOTIFY_SOCKET`.

With `Type=notify` (and `NotifyAccess=all`, since the frontend is the launcher's child) systemd
waits for `READY=1` before it considers the service started.
"""

from __future__ import annotations

import logging
import os
import socket

logger = logging.getLogger(__name__)


def sd_notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1\\nSTATUS=...") if systemd asked for it; True if sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        logger.warning("NOTIFY_SOCKET %r is not a unix socket path; not notifying systemd", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        logger.warning("could not notify systemd at %s: %s", os.environ["NOTIFY_SOCKET"], exc)
        return False
    return True
