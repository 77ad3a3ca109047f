#!/usr/bin/env bash
# Stands in for `ollama` where there is no GPU: `sim-ollama.sh serve` runs one
# simulated Ollama server (`corral sim`) where OLLAMA_HOST says, as
# `ollama serve` would. Try the job scripts on one machine with
# OLLAMA_BIN=/path/to/sim-ollama.sh.
set -euo pipefail
if [ "${1:-}" != serve ]; then
    echo "sim-ollama.sh: only 'serve' is simulated" >&2
    exit 2
fi
host=${OLLAMA_HOST:-127.0.0.1:11434}
exec "${CORRAL_BIN:-corral}" sim --host "${host%:*}" --port-start "${host##*:}" --count 1
