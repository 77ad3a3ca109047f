#!/usr/bin/env bash
# A Slurm batch job that serves one Ollama backend to corral until its time
# limit: `sbatch slurm-job.sh`. Two minutes before the limit Slurm sends TERM
# to this script (--signal=B:TERM@120) and the backend leaves cleanly.
#SBATCH --job-name=ollama
#SBATCH --gres=gpu:1
#SBATCH --time=04:00:00
#SBATCH --signal=B:TERM@120
#SBATCH --output=ollama-%j.log
#
# Set CORRAL_PROXY (and REGISTRATION_KEY) in the environment you submit from
# (sbatch exports it), or here. Slurm runs a copy of this script, so the
# runner is found through CORRAL_EXAMPLES, the folder that holds it.
set -euo pipefail
examples=${CORRAL_EXAMPLES:-$HOME/corral/examples/cluster}
exec "$examples/run-backend.sh"
