#!/usr/bin/env bash
# One Ollama backend for corral inside a batch job (the SGE and Slurm job
# scripts beside this file run it): starts `ollama serve` on a free port,
# registers it with corral (`corral register`, which renews the lease while
# Ollama answers), and on the scheduler's warning signal before the time
# limit (TERM, USR1 or USR2) lets corral drain it, waits for its in-flight
# requests, deregisters, stops Ollama and exits 0.
#
# Settings (environment):
#   CORRAL_PROXY          the corral, e.g. http://proxyhost:11434 (required)
#   REGISTRATION_KEY      the proxy's REGISTRATION_KEY, if it has one
#   CORRAL_NODE           name the proxy reaches this node by (default: hostname -f)
#   OLLAMA_PORT           port for Ollama (default: a free one from 20000-29999)
#   OLLAMA_BIND           address Ollama listens on (default: 0.0.0.0)
#   CORRAL_LEASE_SECONDS  registration lease (default: 30)
#   CORRAL_GRACE_SECONDS  longest wait for in-flight requests at the end (default: 60)
#   OLLAMA_BIN, CORRAL_BIN  the programs (default: ollama, corral on PATH);
#                         OLLAMA_BIN=sim-ollama.sh tries all this without a GPU.
# Needs bash 4.3 or later (wait -n).
set -euo pipefail

: "${CORRAL_PROXY:?set CORRAL_PROXY to the corral URL, e.g. http://proxyhost:11434}"
ollama_bin=${OLLAMA_BIN:-ollama}
corral_bin=${CORRAL_BIN:-corral}
node=${CORRAL_NODE:-$(hostname -f 2>/dev/null || hostname)}
bind=${OLLAMA_BIND:-0.0.0.0}

# A port nothing listens on here, searched upwards from a random start.
free_port() {
    local port=$((20000 + RANDOM % 10000))
    while (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
        port=$((port + 1))
    done
    echo "$port"
}
port=${OLLAMA_PORT:-$(free_port)}

echo "run-backend: pid $$, ollama on $bind:$port, registering http://$node:$port with $CORRAL_PROXY"
OLLAMA_HOST="$bind:$port" "$ollama_bin" serve &
ollama_pid=$!
"$corral_bin" register --proxy "$CORRAL_PROXY" --url "http://$node:$port" \
    --check "http://127.0.0.1:$port" \
    --lease "${CORRAL_LEASE_SECONDS:-30}" --grace "${CORRAL_GRACE_SECONDS:-60}" &
register_pid=$!

# Ends the job cleanly: corral register drains, waits and deregisters before
# Ollama stops, so no request is cut off.
stop() {
    local status=$1
    trap - TERM INT USR1 USR2
    kill -TERM "$register_pid" 2>/dev/null || true
    wait "$register_pid" || status=1
    kill -TERM "$ollama_pid" 2>/dev/null || true
    wait "$ollama_pid" || true
    echo "run-backend: done (exit $status)"
    exit "$status"
}
trap 'stop 0' TERM INT USR1 USR2

# Either one ending by itself (Ollama crashed, the registration was refused)
# ends the job with an error.
wait -n || true
echo "run-backend: ollama or corral register ended by itself" >&2
stop 1
