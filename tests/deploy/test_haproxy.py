"""deploy/haproxy/haproxy.cfg as committed: HAProxy accepts it, and it keeps the settings that
streams and failover depend on. tests/e2e/test_replicas.py runs it with two real replicas."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess

HAPROXY_CFG = pathlib.Path(__file__).parents[2] / "deploy" / "haproxy" / "haproxy.cfg"


def directives() -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in HAPROXY_CFG.read_text().splitlines())
    return [line for line in lines if line]


def test_haproxy_accepts_the_committed_config():
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    assert os.path.exists(haproxy), "haproxy is not installed (scripts/run_tests.sh installs it)"
    result = subprocess.run([haproxy, "-c", "-f", str(HAPROXY_CFG)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


def test_streams_are_neither_compressed_nor_cut_by_a_short_timeout():
    lines = directives()
    assert not any(line.startswith("compression") for line in lines)  # gzip holds events back
    for side in ("client", "server"):
        [timeout] = [line for line in lines if line.startswith(f"timeout {side} ")]
        value, unit = re.fullmatch(rf"timeout {side} (\d+)(s|m)", timeout).groups()
        assert int(value) * (60 if unit == "m" else 1) >= 300, timeout


def test_health_checks_retries_and_affinity_are_configured():
    lines = directives()
    assert "http-check send meth GET uri /health" in lines and "http-check expect status 200" in lines
    assert any(line.startswith("default-server check") for line in lines)
    assert "option redispatch 1" in lines
    [retry_on] = [line for line in lines if line.startswith("retry-on ")]
    assert {"conn-failure", "empty-response"} <= set(retry_on.split()[1:])
    assert "stick on req.hdr(X-Session-ID)" in lines
    assert len([line for line in lines if line.startswith("server ")]) >= 2
