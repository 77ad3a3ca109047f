#!/usr/bin/env bash
# Runs the official Python clients (ollama, openai, anthropic) against corral over a
# simulated fleet: builds corral, starts `corral sim` and `corral serve` on
# free loopback ports, runs pytest, and stops both by PID.
#   bash tests/python/run.sh      (needs: pip install ollama openai anthropic pytest)
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --quiet
bin=target/debug/corral
log=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$log"; }
trap cleanup EXIT

# Free ports: a random block for three backends, retried if taken.
for _ in 1 2 3 4 5 6 7 8; do
  base=$((20000 + RANDOM % 9000))
  "$bin" sim --count 3 --port-start "$base" >"$log/sim" 2>&1 &
  sim=$!
  for _ in $(seq 50); do grep -q "127.0.0.1:$((base + 2))" "$log/sim" 2>/dev/null && break; kill -0 "$sim" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$sim" 2>/dev/null && grep -q "127.0.0.1:$((base + 2))" "$log/sim"; then pids+=("$sim"); break; fi
  wait "$sim" 2>/dev/null || true
done
[ ${#pids[@]} -eq 1 ] || { echo "could not start corral sim"; cat "$log/sim"; exit 1; }

port=$((base + 3 + RANDOM % 500))
PROXY_HOST=127.0.0.1 PROXY_PORT=$port BACKEND_PORT_START=$base BACKEND_PORT_END=$((base + 2)) \
  SCAN_INTERVAL_SECONDS=0.5 "$bin" serve >"$log/proxy" 2>&1 &
pids+=($!)
url="http://127.0.0.1:$port"
healthy() {
  python3 -c 'import json,sys,urllib.request; sys.exit(json.load(urllib.request.urlopen(sys.argv[1] + "/__proxy/health"))["healthy_backends"] != 3)' "$url" 2>/dev/null
}
for _ in $(seq 100); do healthy && break; sleep 0.1; done
healthy || { echo "corral did not see its backends"; cat "$log/proxy"; exit 1; }

CORRAL_URL="$url" python3 -m pytest -q tests/python
