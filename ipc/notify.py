"""The children's reports to the launcher: systemd's notification protocol without libsystemd.

A state is one datagram of `KEY=value` lines sent to `$NOTIFY_SOCKET`. Under systemd
(`Type=notify`) that is systemd's socket; under the launcher it is the launcher's own, which
prints "serving ... on http://..." on `READY=1` and forwards the systemd states to systemd's
socket, if any. A child that cannot start sends `STARTUP_ERROR=<one line>` and exits with
`STARTUP_FAILED_EXIT_CODE`; the launcher prints the first such line once, however many
children fail, and no traceback (those are logged at `--log-level debug`).
"""

from __future__ import annotations

import logging
import os
import socket
import sys

logger = logging.getLogger(__name__)

STARTUP_ERROR_KEY = "STARTUP_ERROR"
STARTUP_FAILED_EXIT_CODE = 78  # sysexits' EX_CONFIG: a bad artifact or setting, not a crash


def sd_notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1\\nSTATUS=...") if someone asked for it; True if sent."""
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


def report_startup_error(line: str) -> int:
    """Tell the launcher why this process cannot start (or print it, when run on its own);
    returns the exit code the process should end with."""
    line = " ".join(line.split())  # one line, whatever the cause's text holds
    if not sd_notify(f"{STARTUP_ERROR_KEY}={line}"):
        print(line, file=sys.stderr, flush=True)
    return STARTUP_FAILED_EXIT_CODE


def parse_state(data: bytes) -> dict[str, str]:
    """A datagram's `KEY=value` lines as a dict (a malformed line is skipped)."""
    state = {}
    for line in data.decode(errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            state[key] = value
    return state
