#!/usr/bin/env bash
# Memory of the proxy with a full queue: 10,000 requests of 10 KB each wait
# behind one backend that never answers (`corral sim --hang-rate 1`).
#
#   bash bench/queue_memory.sh            # builds target/release/corral first
#   REQUESTS=2000 bash bench/queue_memory.sh
#
# Prints the proxy's RSS idle, with the queue full, and after the clients
# left. Loopback only; bounded in count (REQUESTS) and time (about a minute);
# stops only the processes it started, by PID. Needs python3 for the clients.
set -euo pipefail
cd "$(dirname "$0")/.."

REQUESTS=${REQUESTS:-10000}
BODY_BYTES=${BODY_BYTES:-10240}
SIM_PORT=${SIM_PORT:-24990}
PROXY_PORT=${PROXY_PORT:-24980}
BIN=target/release/corral
[ -x "$BIN" ] || cargo build --release --bin corral

ulimit -n "$(ulimit -Hn)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

"$BIN" sim --port-start "$SIM_PORT" --count 1 --hang-rate 1 --log-level ERROR &
pids+=($!)
PROXY_HOST=127.0.0.1 PROXY_PORT=$PROXY_PORT BACKEND_PORT_START=$SIM_PORT BACKEND_PORT_END=$SIM_PORT \
  SCAN_INTERVAL_SECONDS=1 MAX_CONCURRENT_PER_BACKEND=1 LOG_LEVEL=ERROR "$BIN" serve &
proxy=$!
pids+=($proxy)

rss() { awk '/^VmRSS:/ {print $2}' "/proc/$proxy/status"; }
for _ in $(seq 100); do
  curl -fs "http://127.0.0.1:$PROXY_PORT/__proxy/health" | grep -q '"healthy_backends":1' && break
  sleep 0.1
done
idle=$(rss)

python3 - "$PROXY_PORT" "$REQUESTS" "$BODY_BYTES" "$proxy" <<'PY'
import asyncio, json, sys, urllib.request
port, n, size, pid = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
prompt = "x" * (size - 60)
body = json.dumps({"model": "llama3.2", "prompt": prompt, "stream": False}).encode()
head = (f"POST /api/generate HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n").encode()

def waiting():
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/__proxy/backends", timeout=5) as r:
        return json.load(r)["queue"]

async def main():
    conns = []
    for i in range(n):
        _, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(head + body)
        conns.append(w)
        if i % 500 == 499:
            await asyncio.sleep(0)
    for _ in range(600):
        q = waiting()
        if q["waiting"] + 1 >= n:
            break
        await asyncio.sleep(0.1)
    q = waiting()
    rss = [l for l in open(f"/proc/{pid}/status") if l.startswith(("VmRSS", "VmHWM"))]
    print(f"queued: {q['waiting']} waiting, {q['bytes']} bytes; proxy " + ", ".join(l.split()[0] + " " + l.split()[1] + " kB" for l in rss))
    for w in conns:
        w.close()
    await asyncio.sleep(1)

asyncio.run(main())
PY
for _ in $(seq 100); do
  curl -fs "http://127.0.0.1:$PROXY_PORT/__proxy/backends" | grep -q '"waiting":0' && break
  sleep 0.1
done
queue=$(curl -fs "http://127.0.0.1:$PROXY_PORT/__proxy/backends" | python3 -c 'import json,sys; print(json.load(sys.stdin)["queue"])')
echo "proxy RSS: idle ${idle} kB, after the clients left $(rss) kB (queue now $queue)"
