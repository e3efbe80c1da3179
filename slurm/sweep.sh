#!/usr/bin/env bash
#SBATCH --job-name=qsparse-sweep
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=1
#SBATCH --time=04:00:00
#SBATCH --output=runs/slurm/%x-%A_%a.out
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#
# A sweep (tools/sweep.py) as a Slurm job array: array task I trains grid point I, on one node.
#
#   mkdir -p runs/slurm
#   n=$(.venv/bin/python tools/sweep.py SWEEP.yaml --list | wc -l)
#   sbatch --array=0-$((n - 1))%16 slurm/sweep.sh SWEEP.yaml          # at most 16 runs at once
#   .venv/bin/python tools/sweep.py SWEEP.yaml --collect               # results.csv, when the tasks are done
#
# A finished grid point is skipped, so resubmitting the whole array after a failure only trains what is missing.
# The sweep file's `processes` sets the trainer processes of each run (torchrun --standalone on the task's node;
# raise --gpus-per-node to match). On SIGUSR1 (preemption, or 120 s before the time limit) the run checkpoints
# and stops (exit 75) and the task requeues itself; the requeued task resumes from that checkpoint.
# Environment: QSPARSE_REPO (default: the submit directory), QSPARSE_PYTHON (default: $QSPARSE_REPO/.venv/bin/python),
# QSPARSE_MAX_RESTARTS (default 50).

set -uo pipefail  # no -e: the sweep's exit status is inspected below
if (($# < 1)); then
    echo "usage: sbatch --array=0-N slurm/sweep.sh SWEEP.yaml [SWEEP ARGS...]" >&2
    exit 2
fi
REPO="${QSPARSE_REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}"
PYTHON="${QSPARSE_PYTHON:-$REPO/.venv/bin/python}"
args=("$REPO/tools/sweep.py" "$@")
if [[ -n "${SLURM_ARRAY_TASK_ID:-}" ]]; then
    args+=(--index "$SLURM_ARRAY_TASK_ID")
fi

CHILD=""
# shellcheck disable=SC2317  # a trap handler
on_usr1() {
    echo "[sweep.sh] SIGUSR1: asking the run to checkpoint and stop"
    [[ -n "$CHILD" ]] && kill -TERM "$CHILD" 2>/dev/null
}
trap on_usr1 USR1

"$PYTHON" "${args[@]}" &
CHILD=$!
status=0
# wait returns early (status > 128) when a trapped signal arrives: wait again until the sweep itself has ended.
while true; do
    wait "$CHILD"
    status=$?
    kill -0 "$CHILD" 2>/dev/null || break
done

if ((status == 75)) && [[ -n "${SLURM_JOB_ID:-}" ]]; then
    restarts="${SLURM_RESTART_COUNT:-0}"
    if ((restarts < ${QSPARSE_MAX_RESTARTS:-50})); then
        task="${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}${SLURM_ARRAY_TASK_ID:+_$SLURM_ARRAY_TASK_ID}"
        echo "[sweep.sh] requeueing $task (restart $((restarts + 1)))"
        scontrol requeue "$task"
    else
        echo "[sweep.sh] not requeueing: $restarts restarts reached QSPARSE_MAX_RESTARTS"
    fi
fi
exit "$status"
