"""`python -m engine_core --config-json JSON`: the engine-core process (started by the launcher)."""

import argparse
import logging
import sys

from engine_core.process import run_engine_core
from ipc.config import EngineConfig


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m engine_core")
    parser.add_argument("--config-json", required=True, help="an EngineConfig as JSON")
    args = parser.parse_args()
    config = EngineConfig.from_json(args.config_json)
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s [engine] %(message)s",
    )
    return run_engine_core(config)


if __name__ == "__main__":
    sys.exit(main())
