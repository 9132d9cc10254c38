#!/usr/bin/env bash
# Chat completion with curl against a running `furiosa-llm serve` (default: localhost:8000).
# Usage: bash examples/curl_chat_completions.sh [BASE_URL]
set -euo pipefail
BASE_URL="${1:-http://localhost:8000}"
MODEL=$(curl -s "$BASE_URL/v1/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')

curl -s "$BASE_URL/v1/chat/completions" \
  -H "Content-Type: application/json" \
  -d "{
    \"model\": \"$MODEL\",
    \"messages\": [{\"role\": \"user\", \"content\": \"What is the capital of France?\"}],
    \"max_tokens\": 32,
    \"temperature\": 0
  }"
echo
