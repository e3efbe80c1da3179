#!/usr/bin/env bash
#SBATCH --job-name=qsparse-700m
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
# Q-Sparse 700M (pretrain_scripts/configs/700m.yaml): 1 node x 8 GPUs, data parallel 8 (ZeRO-2),
# 4 microbatches of 8 per step.
#
#   mkdir -p runs/slurm     # sbatch does not create the --output directory (the job would not start)
#   sbatch slurm/pretrain_700m.sh                                            # pretrain_scripts/configs/700m.yaml
#   sbatch slurm/pretrain_700m.sh pretrain_scripts/configs/700m-bitnet.yaml  # the BitNet b1.58 variant
#   sbatch slurm/pretrain_700m.sh --set train.steps=2000                     # trainer arguments after the config
#
# An optional first argument ending in .yaml replaces the config; the rest goes to the trainer. Options on the
# sbatch command line override the #SBATCH lines (e.g. --nodes, --time, --partition, --account). Submit from the
# repository root. Environment overrides (QSPARSE_SET, QSPARSE_RUN_DIR, QSPARSE_NPROC_PER_NODE, ...) and the
# preemption/requeue behaviour: slurm/launch.sh, slurm/README.md.

set -euo pipefail
# sbatch runs a copy of this file from its spool directory: find the repository from the submit directory.
REPO="${QSPARSE_REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}"
# exec: the launcher becomes the batch shell, so Slurm's SIGUSR1 (--signal=B:...) reaches it.
exec bash "$REPO/slurm/launch.sh" pretrain_scripts/configs/700m.yaml "$@"
