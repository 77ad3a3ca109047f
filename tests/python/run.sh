#!/usr/bin/env bash
# Runs the official Python clients (ollama, openai, anthropic) against corral over a
# simulated fleet: builds corral, starts `corral sim` and `corral serve` on
# loopback ports they bind themselves, runs pytest, and stops both by PID.
#   bash tests/python/run.sh      (needs: pip install ollama openai anthropic pytest)
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --quiet
bin=${CARGO_TARGET_DIR:-target}/debug/corral
log=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$log"; }
trap cleanup EXIT

# Both bind their own ports (port 0) and say where: nothing is freed and
# bound again. `--port-start 0`: the sim finds a free block of three.
"$bin" sim --count 3 --port-start 0 >"$log/sim" 2>&1 &
pids+=($!)
# The first 127.0.0.1:port in what file `$1` has matching `$2`, once written.
address() {
  for _ in $(seq 100); do
    a=$(grep -o "$2" "$1" 2>/dev/null | head -n 1 | grep -o '127\.0\.0\.1:[0-9]*' || true)
    [ -n "$a" ] && { echo "$a"; return; }
    sleep 0.1
  done
  echo "no '$2' in $1:" >&2; cat "$1" >&2; exit 1
}
first=$(address "$log/sim" 'listening on http://127\.0\.0\.1:[0-9]*')
first=${first#*:}
PROXY_HOST=127.0.0.1 PROXY_PORT=0 BACKEND_PORT_START=$first BACKEND_PORT_END=$((first + 2)) \
  SCAN_INTERVAL_SECONDS=0.5 LOG_LEVEL=info "$bin" serve >"$log/proxy" 2>&1 &
pids+=($!)
url="http://$(address "$log/proxy" 'corral listening.*addr=127\.0\.0\.1:[0-9]*')"
healthy() {
  python3 -c 'import json,sys,urllib.request; sys.exit(json.load(urllib.request.urlopen(sys.argv[1] + "/__proxy/health"))["healthy_backends"] != 3)' "$url" 2>/dev/null
}
for _ in $(seq 100); do healthy && break; sleep 0.1; done
healthy || { echo "corral did not see its backends"; cat "$log/proxy"; exit 1; }

CORRAL_URL="$url" python3 -m pytest -q tests/python
