"""systemd's notification protocol without libsystemd: one datagram to `$NOTIFY_SOCKET`.

With `Type=notify` systemd waits for `READY=1` before it considers the service started. The
frontend sends it once it listens and the engine is ready; the launcher, whose own socket the
frontend's `$NOTIFY_SOCKET` names, prints its "serving on" line then and forwards the state to
systemd. The implementation lives in `ipc.notify`, shared with the engine core.
"""

from ipc.notify import sd_notify

__all__ = ["sd_notify"]
