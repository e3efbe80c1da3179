#!/usr/bin/env bash
#SBATCH --job-name=qsparse
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=runs/slurm/%x-%j.out
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#
# Any config on Slurm: the config is the first argument, further arguments go to the trainer.
#
#   mkdir -p runs/slurm     # sbatch does not create the --output directory (the job would not start)
#   sbatch slurm/pretrain.sh pretrain_scripts/configs/300m-moe.yaml
#   sbatch --nodes=2 --time=48:00:00 slurm/pretrain.sh pretrain_scripts/configs/1.3b-bitnet.yaml --set train.steps=5000
#
# Options on the sbatch command line override the #SBATCH lines above. Submit from the repository root (the job
# runs there). One task per node runs torchrun with one process per GPU; environment overrides (QSPARSE_SET,
# QSPARSE_RUN_DIR, QSPARSE_NPROC_PER_NODE, ...) and the preemption/requeue behaviour: slurm/launch.sh,
# slurm/README.md. The sized scripts slurm/pretrain_{300m,700m,1p3b,7b}.sh carry headers for each model.

set -euo pipefail
if (($# < 1)); then
    echo "usage: sbatch slurm/pretrain.sh CONFIG [TRAINER ARGS...]" >&2
    exit 2
fi
# sbatch runs a copy of this file from its spool directory: find the repository from the submit directory.
REPO="${QSPARSE_REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}"
# exec: the launcher becomes the batch shell, so Slurm's SIGUSR1 (--signal=B:...) reaches it.
exec bash "$REPO/slurm/launch.sh" "$@"
