#!/usr/bin/env bash
# Serve a model with vLLM's OpenAI-compatible server and VUA's V1 KV connector, then send the
# same long prompt twice: the first request computes and stores its KV, the second loads it.
#
#   example/serve-vllm.sh                                   # built-in random-weight Llama, temp store
#   MODEL=/models/Llama-3.1-8B VUA_ROOT=/mnt/shared/vua example/serve-vllm.sh
#   KEEP_SERVING=1 example/serve-vllm.sh                    # stay up after the two requests (Ctrl-C stops)
#
# Other knobs: PORT (8000), KV_CACHE_BYTES (2g, vLLM's KV cache), CHUNK_SIZE (256 tokens per stored fragment, a multiple of the KV
# block size), PROMPT_WORDS (2000), PYTHON (the venv's python).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$repo/.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
PORT=${PORT:-8000}
CHUNK_SIZE=${CHUNK_SIZE:-256}
PROMPT_WORDS=${PROMPT_WORDS:-2000}
MODEL=${MODEL:-$("$PYTHON" -c 'from vua.tools.tinymodel import build_tiny_llama; print(build_tiny_llama())')}

made_root=""
if [ -z "${VUA_ROOT:-}" ]; then
    VUA_ROOT=$(mktemp -d -t vua-serve-XXXXXX)
    made_root=$VUA_ROOT
fi
log=$(mktemp -t vua-serve-log-XXXXXX)

config=$(cat <<JSON
{"kv_connector": "VUAStorageConnector_V1",
 "kv_connector_module_path": "vua.vllm.kv_connector_v1",
 "kv_role": "kv_both",
 "kv_connector_extra_config": {"shared_storage_path": "$VUA_ROOT", "chunk_size": $CHUNK_SIZE}}
JSON
)

echo "serving $MODEL on port $PORT, KV store $VUA_ROOT (server log: $log)"
# Prefix caching off so that the second request's reuse visibly comes from the store.
"$PYTHON" "$repo/bin/vua-vllm" serve "$MODEL" --port "$PORT" \
    --kv-transfer-config "$config" --no-enable-prefix-caching --enable-prompt-tokens-details \
    --enforce-eager --max-model-len 4096 --kv-cache-memory-bytes "${KV_CACHE_BYTES:-2g}" >"$log" 2>&1 &
server=$!

cleanup() {
    if kill -0 "$server" 2>/dev/null; then
        kill -TERM "$server" 2>/dev/null || true
        for _ in $(seq 60); do kill -0 "$server" 2>/dev/null || break; sleep 0.5; done
        kill -KILL "$server" 2>/dev/null || true
    fi
    wait "$server" 2>/dev/null || true
    [ -n "$made_root" ] && rm -rf "$made_root"
    rm -f "$log"
}
trap cleanup EXIT

echo -n "waiting for the server (engine start-up takes a while on CPU)"
until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null 2>&1; do
    if ! kill -0 "$server" 2>/dev/null; then
        echo; echo "the server exited; last lines of its log:"; tail -n 30 "$log"; exit 1
    fi
    echo -n "."; sleep 2
done
echo " ready"

# Two identical requests; the second must reuse stored KV and produce the same text.
"$PYTHON" - "$PORT" "$MODEL" "$PROMPT_WORDS" <<'PY'
import json, random, sys, time, urllib.request

port, model, words = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = random.Random(0)
prompt = " ".join(f"w{rng.randrange(16, 2000)}" for _ in range(words))
body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0}).encode()
texts, reused = [], 0
for attempt in ("first (compute + store)", "second (load)"):
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"})
    start = time.perf_counter()
    reply = json.load(urllib.request.urlopen(request, timeout=600))
    seconds = time.perf_counter() - start
    usage = reply["usage"]
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    texts.append(reply["choices"][0]["text"])
    reused = cached
    print(f"{attempt:>24}: {seconds:6.2f} s, {usage['prompt_tokens']} prompt tokens, {cached} reused")
    time.sleep(1)  # the connector stores in the background; give it a moment before asking again
same = texts[0] == texts[1]
print("same completion both times:", "yes" if same else "NO")
if not reused:
    print("the second request reused nothing from the store", file=sys.stderr)
sys.exit(0 if same and reused else 1)
PY

if [ -n "${KEEP_SERVING:-}" ]; then
    echo "still serving on port $PORT; Ctrl-C to stop"
    wait "$server"
fi
