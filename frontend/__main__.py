"""`python -m frontend --config-json JSON`: the frontend process, as spawned by the launcher."""

from __future__ import annotations

import argparse
import logging
import sys

import msgspec
import uvicorn

from frontend.app import create_app
from ipc.config import ServeConfig

# In-flight requests get this long to finish after SIGTERM before they are cancelled (which
# aborts them in the engine).
GRACEFUL_SHUTDOWN_TIMEOUT_S = 30


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m frontend", description=__doc__)
    parser.add_argument("--config-json", required=True, help="a ServeConfig as JSON (from the launcher)")
    args = parser.parse_args(argv)
    try:
        config = ServeConfig.from_json(args.config_json)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        print(f"frontend: invalid --config-json: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=getattr(logging, config.log_level.upper(), logging.INFO), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        uvicorn.run(
            create_app(config),
            host=config.host,
            port=config.port,
            log_level=config.log_level,
            # "on", not "auto": with "auto" uvicorn logs a failed startup (tokenizer missing)
            # and serves anyway.
            lifespan="on",
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_TIMEOUT_S,
        )
    except SystemExit as exc:  # uvicorn exits with 3 when startup fails
        return exc.code if isinstance(exc.code, int) else 1
    except Exception:
        logging.getLogger("frontend").exception("the frontend failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
