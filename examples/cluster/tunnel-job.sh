#!/usr/bin/env bash
# The reverse-tunnel variant, for clusters whose compute nodes the proxy host
# cannot reach (only the nodes can reach it, by SSH). One SSH connection
# carries both ways: -R puts this job's Ollama on the proxy host at
# 127.0.0.1:$remote_port, -L puts the proxy's corral at 127.0.0.1:$local_port
# here, and `corral register` registers the tunnel's far end. Submit like
# slurm-job.sh (the #SBATCH lines) or adapt the #$ lines of sge-job.sh.
#SBATCH --job-name=ollama-tunnel
#SBATCH --gres=gpu:1
#SBATCH --time=04:00:00
#SBATCH --signal=B:TERM@120
#SBATCH --output=ollama-tunnel-%j.log
#
# Settings (environment):
#   CORRAL_SSH_HOST   the proxy host as ssh knows it, user@proxyhost (required;
#                     key-based login, no passphrase prompt)
#   CORRAL_PORT       corral's port on the proxy host (default: 11434)
#   REGISTRATION_KEY, CORRAL_LEASE_SECONDS, CORRAL_GRACE_SECONDS, OLLAMA_BIN,
#   CORRAL_BIN        as for run-backend.sh
set -euo pipefail

: "${CORRAL_SSH_HOST:?set CORRAL_SSH_HOST to user@proxyhost}"
ollama_bin=${OLLAMA_BIN:-ollama}
corral_bin=${CORRAL_BIN:-corral}

free_port() {
    local port=$((20000 + RANDOM % 10000))
    while (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
        port=$((port + 1))
    done
    echo "$port"
}
port=$(free_port)
local_port=$(free_port)

OLLAMA_HOST="127.0.0.1:$port" "$ollama_bin" serve &
ollama_pid=$!

# The far end's port is picked at random; another job holding it makes ssh
# fail at once (ExitOnForwardFailure), and another is tried.
for _ in 1 2 3 4 5; do
    remote_port=$((30000 + RANDOM % 10000))
    ssh -N -o ExitOnForwardFailure=yes -o ServerAliveInterval=30 -o BatchMode=yes \
        -R "127.0.0.1:$remote_port:127.0.0.1:$port" \
        -L "127.0.0.1:$local_port:127.0.0.1:${CORRAL_PORT:-11434}" \
        "$CORRAL_SSH_HOST" &
    ssh_pid=$!
    sleep 3
    if kill -0 "$ssh_pid" 2>/dev/null; then
        break
    fi
    wait "$ssh_pid" || true
    ssh_pid=
done
if [ -z "${ssh_pid:-}" ]; then
    echo "tunnel-job: no tunnel to $CORRAL_SSH_HOST" >&2
    kill -TERM "$ollama_pid"
    exit 1
fi

"$corral_bin" register --proxy "http://127.0.0.1:$local_port" \
    --url "http://127.0.0.1:$remote_port" --check "http://127.0.0.1:$port" \
    --lease "${CORRAL_LEASE_SECONDS:-30}" --grace "${CORRAL_GRACE_SECONDS:-60}" &
register_pid=$!

stop() {
    local status=$1
    trap - TERM INT USR1 USR2
    kill -TERM "$register_pid" 2>/dev/null || true
    wait "$register_pid" || status=1
    kill -TERM "$ssh_pid" "$ollama_pid" 2>/dev/null || true
    wait "$ssh_pid" "$ollama_pid" || true
    exit "$status"
}
trap 'stop 0' TERM INT USR1 USR2
wait -n || true
echo "tunnel-job: ollama, ssh or corral register ended by itself" >&2
stop 1
