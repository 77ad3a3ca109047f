#!/usr/bin/env bash
# An SGE (Son of Grid Engine, Univa/Altair Grid Engine) job that serves one
# Ollama backend to corral until its time limit: `qsub sge-job.sh`. At the
# soft limit s_rt SGE sends USR1 and the backend leaves cleanly before the
# hard limit h_rt kills the job; with -notify, USR2 before a qdel does the same.
#$ -N ollama
#$ -S /bin/bash
#$ -cwd
#$ -j y
#$ -V
#$ -notify
#$ -l gpu=1
#$ -l s_rt=03:58:00,h_rt=04:00:00
#
# -V passes CORRAL_PROXY (and REGISTRATION_KEY) from the submitting shell.
# SGE runs a copy of this script, so the runner is found through
# CORRAL_EXAMPLES, the folder that holds it.
set -euo pipefail
examples=${CORRAL_EXAMPLES:-$HOME/corral/examples/cluster}
exec "$examples/run-backend.sh"
