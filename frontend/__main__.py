"""`python -m frontend --config-json JSON`: the frontend process, as spawned by the launcher.

The launcher passes the API key in `FURIOSA_LLM_API_KEY`, never on the command line, where
every local user could read it. The tokenizer and the chat template are loaded before uvicorn
starts, so a bad one is one line to the launcher (`ipc.notify`) and exit code
`STARTUP_FAILED_EXIT_CODE`, its traceback logged at debug level only.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys

import msgspec
import uvicorn
from litestar import Litestar

from frontend.app import create_app
from frontend.chat_template import load_chat_template
from frontend.config import FrontendConfig
from frontend.engine_client import EngineDeadError
from frontend.sd_notify import sd_notify
from frontend.tokenizer import TokenizerLoadError, load_tokenizer
from ipc.notify import report_startup_error

# After SIGTERM in-flight requests get --shutdown-timeout seconds; this long before it runs out,
# the ones still running end with an error (an error event and [DONE] for a stream) and are
# aborted in the engine, so that no connection is cut mid-chunk when uvicorn cancels them.
STREAM_END_MARGIN_S = 1.0
API_KEY_ENV = "FURIOSA_LLM_API_KEY"


class FrontendServer(uvicorn.Server):
    """uvicorn's server that tells systemd `READY=1` once it listens and the engine is ready."""

    def __init__(self, config: uvicorn.Config, app: Litestar) -> None:
        super().__init__(config)
        self.app = app
        self._notifier: asyncio.Task | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:  # the lifespan has built the services, and the sockets listen
            self._notifier = asyncio.create_task(self._notify_when_ready())

    async def _notify_when_ready(self) -> None:
        services = self.app.state.services
        try:
            await services.engine_client.wait_ready()
        except EngineDeadError:
            return  # the launcher exits non-zero; systemd sees a failed start
        sd_notify(f"READY=1\nSTATUS=serving {services.config.served_model_name}")

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self._notifier is not None:
            self._notifier.cancel()
        sd_notify("STOPPING=1\nSTATUS=draining in-flight requests")
        grace_s = self.config.timeout_graceful_shutdown or 0
        deadline = asyncio.get_running_loop().call_later(max(0.0, grace_s - STREAM_END_MARGIN_S),
                                                         self._stop_in_flight, grace_s)
        try:
            await super().shutdown(sockets)
        finally:
            deadline.cancel()

    def _stop_in_flight(self, grace_s: float) -> None:
        services = getattr(self.app.state, "services", None)
        if services is not None:
            services.engine_client.stop_in_flight(f"the {grace_s:g} s shutdown grace period ran out")


class _StartupChatter(logging.Filter):
    """Drops uvicorn's start-up lines ("Uvicorn running on http://..." comes before the engine is
    ready); the launcher prints its "serving on" line once the server is ready instead."""

    PREFIXES = ("Started server process", "Waiting for application startup",
                "Application startup complete", "Uvicorn running on")

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.INFO and str(record.msg).startswith(self.PREFIXES))


class StartupError(Exception):
    """The frontend cannot start; the message is the one line for the operator."""


def load_startup_files(config: FrontendConfig):
    """The tokenizer, with the chat template checked; raises `StartupError` with one line."""
    try:
        tokenizer = load_tokenizer(config.engine.model)
    except TokenizerLoadError as exc:  # its text starts with the file at fault
        raise StartupError(f"furiosa-llm: cannot load {exc}") from exc
    except Exception as exc:
        raise StartupError(f"furiosa-llm: cannot load the tokenizer of {config.engine.model}: "
                           f"{type(exc).__name__}: {exc}") from exc
    try:
        load_chat_template(config.chat_template, tokenizer)
    except Exception as exc:  # a ChatTemplateError, or the template's own failure
        source = config.chat_template or f"the chat template of {config.engine.model}"
        raise StartupError(f"furiosa-llm: cannot load {source}: {exc}") from exc
    return tokenizer


def listen(config: FrontendConfig) -> socket.socket:
    """The listening socket, bound before uvicorn starts, so that a port already taken is one
    line like every other start-up failure (uvicorn would log it at ERROR, among others)."""
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((config.host, config.port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise StartupError(f"furiosa-llm: cannot listen on {config.host}:{config.port}: {exc.strerror or exc}") from exc
    return sock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m frontend", description=__doc__)
    parser.add_argument("--config-json", required=True, help="a FrontendConfig as JSON (from the launcher)")
    args = parser.parse_args(argv)
    try:
        config = FrontendConfig.from_json(args.config_json)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        print(f"frontend: invalid --config-json: {exc}", file=sys.stderr)
        return 2
    if config.api_key is None:
        config.api_key = os.environ.get(API_KEY_ENV) or None
    logging.basicConfig(
        level=getattr(logging, config.engine.log_level.upper(), logging.INFO), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        tokenizer = load_startup_files(config)
        sock = listen(config)
    except StartupError as exc:
        logging.getLogger("frontend").debug("the frontend cannot start", exc_info=True)
        return report_startup_error(str(exc))
    app = create_app(config, tokenizer=tokenizer)
    server = FrontendServer(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level=config.engine.log_level,
            # "on", not "auto": with "auto" uvicorn logs a failed startup (tokenizer missing)
            # and serves anyway.
            lifespan="on",
            timeout_graceful_shutdown=config.shutdown_timeout_s,
        ),
        app,
    )
    if config.engine.log_level != "debug":  # uvicorn.Config has configured its loggers by now
        logging.getLogger("uvicorn.error").addFilter(_StartupChatter())
    # uvicorn handles SIGTERM/SIGINT while it serves, drains, then re-raises the signal to the
    # handler that was there before; a drained shutdown is a success, so that one does nothing.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        server.run(sockets=[sock])
    except SystemExit as exc:  # uvicorn exits with 3 when startup fails, 1 when it cannot bind
        return exc.code if isinstance(exc.code, int) else 1
    except Exception:
        logging.getLogger("frontend").exception("the frontend failed")
        return 1
    return 0 if server.started else 3


if __name__ == "__main__":
    sys.exit(main())
