"""scripts/furiosa-llm.service: systemd accepts it, and its stop, restart and readiness settings
fit the launcher. (The READY=1 datagram itself is tested end to end in tests/e2e/test_operation.py.)"""

from __future__ import annotations

import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from frontend import cli

UNIT = pathlib.Path(__file__).parents[1] / "scripts" / "furiosa-llm.service"


def settings() -> dict[str, list[str]]:
    """key -> every value it is given (systemd allows repeated keys), comments dropped."""
    result: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            result.setdefault(key.strip(), []).append(value.strip())
    return result


def one(key: str) -> str:
    [value] = settings()[key]
    return value


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is missing (apt-get install -y --no-install-recommends systemd)")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    # verify checks that ExecStart's program exists: point it at this environment's command
    executable = pathlib.Path(sys.executable).parent / "furiosa-llm"
    text = UNIT.read_text().replace("/opt/furiosa-llm/bin/furiosa-llm", str(executable))
    assert text != UNIT.read_text()
    unit = tmp_path / UNIT.name
    unit.write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    # verify exits 0 even when it ignores a setting it cannot parse; any message is a failure
    assert result.returncode == 0 and result.stderr == "" and result.stdout == "", result.stderr + result.stdout


def test_notify_readiness_restart_on_failure_and_journald():
    assert one("Type") == "notify" and one("NotifyAccess") == "all"  # READY=1 comes from the frontend child
    assert one("Restart") == "on-failure"
    assert one("StandardOutput") == "journal" and one("StandardError") == "journal"


def test_stop_is_a_sigterm_to_the_launcher_with_time_to_drain():
    assert one("KillSignal") == "SIGTERM"
    assert one("KillMode") == "mixed"  # not the whole cgroup at once: the launcher stops children in order
    # the frontend drains for --shutdown-timeout, the launcher then waits its margin, then the engine
    frontend_stop_s = cli.build_parser().parse_args(["serve"]).shutdown_timeout
    assert int(one("TimeoutStopSec")) > frontend_stop_s + cli.FRONTEND_STOP_MARGIN_S + cli.ENGINE_STOP_TIMEOUT_S


def test_flags_come_from_an_optional_environment_file():
    assert one("EnvironmentFile").startswith("-/etc/furiosa-llm/")  # "-": the file may be absent
    executable, *args = shlex.split(one("ExecStart"))
    assert executable.endswith("/furiosa-llm") and args == ["serve", "$FURIOSA_LLM_ARGS"]
    [default] = [v for v in settings()["Environment"] if v.strip('"').startswith("FURIOSA_LLM_ARGS=")]
    flags = default.strip('"').split("=", 1)[1].split()
    parsed = cli.build_parser().parse_args(["serve", *flags])
    assert parsed.port == 8000 and re.fullmatch(r"[\d.]+|localhost", parsed.host)
